"""What one complete payment costs the server, counted (not timed): thread hops and
database transactions, read from ``/metrics`` around it.

A payment on the push channel, without a callback URL: the start, the phone's fetch of the
transaction by its id (after the push), its answer, and the relying party's final status.
Every thread hop on that path is a unit of work written, a read, or a signature verified
(the HSM's signatures and decryptions run in the hop of the write that needs them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import httpx
import pytest

from loadtests.scrape import samples
from tapsign_sdk.client import Client
from tapsign_sdk.device import Device
from tests.e2e.serving import Server, serving
from tests.e2e.test_attacks import SHOP
from tests.e2e.test_flows import enrolled

#: The start's write; the fetch's verification and its nonce's write; the answer's two
#: verifications (its request's and its own) and its write; the status: nothing.
HOPS = 6
#: The start's, the fetch's nonce's and the answer's (no read at all).
TRANSACTIONS = 3


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with nothing of its own to do meanwhile (no callback rescans, no sweeps for
    overdue operations)."""
    config = "[callbacks]\nrescan_seconds = 3600\n[operations]\nsweep_seconds = 3600\n"
    with serving(tmp_path_factory.mktemp("budget"), config=config) as server:
        yield server


def _counters(server: Server) -> dict[str, float]:
    names = (
        "tapsign_database_writes_total",
        "tapsign_database_reads_total",
        "tapsign_verifier_valid_total",
        "tapsign_verifier_invalid_total",
    )
    scraped = samples(httpx.get(f"{server.url}/metrics").text)
    return {name: scraped[name] for name in names}


def test_a_payment_costs_its_budget_of_hops_and_transactions(quiet: Server) -> None:
    with Client(quiet.url, quiet.access_key) as client, closing(Device(quiet.url)) as phone:
        username = enrolled(client, phone)
        for _ in range(2):  # the second one is counted: caches warm, as in production
            before = _counters(quiet)
            started = client.approve(username=username, amount="9.99", currency="EUR", payee=SHOP)
            phone.approve(phone.fetch(started.transaction_id))
            assert client.status(started.status_token, wait=10).status == "succeeded"
            after = _counters(quiet)
    spent = {name: after[name] - before[name] for name in after}
    writes = spent["tapsign_database_writes_total"]
    reads = spent["tapsign_database_reads_total"]
    verified = spent["tapsign_verifier_valid_total"] + spent["tapsign_verifier_invalid_total"]
    assert (writes + reads + verified, writes + reads) == (HOPS, TRANSACTIONS), spent
    assert reads == 0
