"""Two tapsign processes on one database, taking the same requests at the same moment:
exactly one answer of each transaction is taken, and a signed device request once, on SQLite
and on PostgreSQL.

Each test starts two ``tapsign serve`` processes in one directory (one database, one
SoftHSM2 token, one peers directory) on two ports, so that every racing pair lands on both
processes, as it does behind ``--workers 2`` when the kernel spreads the connections.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import httpx
import msgspec
import pytest
import sqlalchemy as sa

from loadtests.run import free_port
from tapsign_sdk.client import Client
from tapsign_sdk.device import Device, answer_message
from tapsign_sdk.model import Decision
from tapsign_sdk.request import sign_headers
from tests.e2e.serving import Server, database_config, postgres_schema, prepare, start
from tests.e2e.test_attacks import answer_body, send_answer
from tests.e2e.test_flows import enrolled, new_username

NOT_PENDING = "https://tapsign.dev/problems/transaction-not-pending"
#: Racing pairs per test and database: the defect these guard against showed in 1 to 6
#: pairs of a hundred.
PAIRS = 150
USERS = 5


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The SQLAlchemy URL of the servers' database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('races') / 'tapsign.db'}"
        return
    with postgres_schema() as url:
        yield url


@pytest.fixture(scope="module")
def two_processes(
    tmp_path_factory: pytest.TempPathFactory, database: str
) -> Iterator[tuple[Server, Server]]:
    directory = tmp_path_factory.mktemp("server")
    # One public URL, as behind a load balancer: the tokens of one process are the other's.
    config = database_config(database) + '[server]\npublic_url = "https://tapsign.test"\n'
    access_key = prepare(directory, config=config)
    ports = [free_port(), free_port()]
    processes = [start(directory, port) for port in ports]
    try:
        first, second = (
            Server(url=f"http://127.0.0.1:{port}", access_key=access_key, directory=directory)
            for port in ports
        )
        yield first, second
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def _outcome(response: httpx.Response) -> str:
    document = response.json()
    if response.status_code >= 400:
        return f"{response.status_code} {document['type']}"
    return f"{response.status_code} {document.get('status', 'ok')}"


def _at_once(*calls: Callable[[], httpx.Response]) -> list[str]:
    """Run ``calls`` at the same moment, each in a thread of its own; their outcomes."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx.Response]) -> str:
        barrier.wait()
        return _outcome(call())

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _terminal_entries(database: str) -> Counter[str]:
    """How many operations have 0, 1, 2 … audit entries of an end (succeeded, failed …)."""
    engine = sa.create_engine(database)
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT o.id, (SELECT count(*) FROM audit_log a WHERE a.operation_id = o.id "
                "AND a.action IN ('operation.succeeded', 'operation.failed', "
                "'operation.cancelled', 'operation.expired')) FROM operations o"
            )
        ).all()
    engine.dispose()
    return Counter(f"{count} ends" for _, count in rows)


def test_a_decline_and_an_approve_at_once_on_two_processes_one_is_taken(
    two_processes: tuple[Server, Server], database: str
) -> None:
    """Half the pairs race an approve against a decline, half the same signed approve
    twice; every pair has exactly one winner, and what the phone was told is what was
    stored. Several users race at once, so that the processes are busy as under load."""
    with ThreadPoolExecutor(USERS) as pool:
        taken = list(pool.map(_race_pairs, [two_processes] * USERS))
    assert sum(taken) == PAIRS
    # Every operation ended once (the other tests' included).
    assert set(_terminal_entries(database)) == {"1 ends"}


def _race_pairs(servers: tuple[Server, Server]) -> int:
    """One user's share of the pairs; how many were taken."""
    first, second = servers
    taken = 0
    with Client(first.url, first.access_key) as client, closing(Device(first.url)) as phone:
        username = enrolled(client, phone)
        for index in range(PAIRS // USERS):
            started = client.approve(username=username)
            operation = phone.pending()[0]
            approve = answer_body(phone.authenticator.answer(operation))
            other = (
                approve
                if index % 2
                else answer_body(phone.authenticator.answer(operation, decision=Decision.DECLINE))
            )
            outcomes = _at_once(
                functools.partial(send_answer, first, phone, operation.id, approve),
                functools.partial(send_answer, second, phone, operation.id, other),
            )
            winners = [outcome for outcome in outcomes if outcome.startswith("200 ")]
            assert len(winners) == 1, outcomes
            assert [outcome for outcome in outcomes if not outcome.startswith("200 ")] == [
                f"409 {NOT_PENDING}"
            ], outcomes
            stored = client.wait_for_result(started.status_token).status
            assert winners == [f"200 {stored}"]
            taken += 1
    return taken


def test_ten_phones_enrolling_on_one_qr_code_across_two_processes(
    two_processes: tuple[Server, Server], database: str
) -> None:
    """One wins, the others are told the enrolment is no longer pending: never a 500."""
    first, second = two_processes
    with Client(first.url, first.access_key) as client:
        for _ in range(10):
            started = client.enroll(username=new_username())
            link = started.enrollment.app_link_uri
            token = Device.dispatch_token(link)
            phones = [Device((first, second)[index % 2].url) for index in range(10)]
            outcomes = _at_once(*(_enrolment(phone, link, token) for phone in phones))
            assert Counter(outcomes) == {"200 succeeded": 1, f"409 {NOT_PENDING}": 9}
            assert client.wait_for_result(started.enrollment.status_token).status == "succeeded"
            assert len(client.get_user(started.user_id).authenticators) == 1
            for phone in phones:
                phone.close()
    assert set(_terminal_entries(database)) == {"1 ends"}


def _enrolment(phone: Device, link: str, token: str) -> Callable[[], httpx.Response]:
    """The answer of ``phone`` to the enrolment behind ``link``, ready to send."""
    operation = phone.redeem(link)
    body = msgspec.json.encode(answer_message(phone.authenticator.answer(operation)))

    def send() -> httpx.Response:
        return httpx.post(
            f"{phone.base_url}/device/v1/operations/{operation.id}/answer",
            content=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        )

    return send


def test_a_device_request_is_taken_once_by_every_process(
    two_processes: tuple[Server, Server],
) -> None:
    """A signed device request, captured and replayed to the other process within its
    minute, is refused there too (issue 11 item 8); so is one replayed to both at once."""
    first, second = two_processes
    with Client(first.url, first.access_key) as client, closing(Device(first.url)) as phone:
        username = enrolled(client, phone)
        assert phone.authenticator_id is not None
        path = "/device/v1/operations"
        for replayed in range(10):
            client.approve(username=username)
            headers = sign_headers(
                authenticator_id=phone.authenticator_id,
                signer=phone.authenticator,
                method="GET",
                path=path,
                body=b"",
            )
            if replayed % 2:
                taken = [
                    httpx.get(server.url + path, headers=headers) for server in (first, second)
                ]
                outcomes = [response.status_code for response in taken]
            else:
                outcomes = sorted(
                    int(outcome.split()[0])
                    for outcome in _at_once(
                        *(
                            functools.partial(httpx.get, server.url + path, headers=headers)
                            for server in (first, second)
                        )
                    )
                )
            assert outcomes == [200, 401], outcomes
