"""The crash test: SIGKILL tapsign under load, restart it, and check from what the clients saw.

Phones and relying parties (the ``sdk/`` clients, one thread each) run transactions back
to back against a real server: start, fetch, answer, long-poll to the final status. A few
transactions are started and left unanswered, to expire. Meanwhile the server is killed
with SIGKILL at random moments and started again in the same directory, on the same port.
Clients treat a refused or broken connection as a phone or a backend would: they wait a
moment and try again, answers included (an answer may have been stored before the kill
took its response away).

Afterwards every transaction is read back, the callbacks are awaited, and the run fails if

* a transaction a client was told ``succeeded`` is not succeeded now;
* any transaction was seen with two different final outcomes;
* an answer was accepted twice (two 2xx answers for one transaction);
* a transaction is still pending after its expiry, or expired late (later than its expiry
  time, or the restart after it, by more than a grace period);
* a transaction that ended got no callback reporting that end.

With ``--hosts N`` (on PostgreSQL, ``--database-url``) N servers share one database, each
in a directory of its own and on its own port, sharing the first one's SoftHSM2 token and
one public URL as hosts behind a load balancer do; each client's backend talks to one host
and its phone to the next, and the hosts are killed one at a time, in turn. Operations of a
host that is down are expired by the others (``[operations] sweep_seconds``, 1 s here).

``make crashtest`` runs it long; the test suite runs a short form (tests/e2e/test_crash.py).
``python -m tests.e2e.crash --help`` shows the options.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx

from loadtests.run import free_port, scratch_schema, shared_token
from tapsign_sdk import wire
from tapsign_sdk.client import ApiError, Client, Payee
from tapsign_sdk.device import Device
from tests.e2e.serving import database_config, prepare, start
from tests.receiver import Receiver, receiving

#: How late an expiry may be, beyond its time or the restart that follows it.
EXPIRY_GRACE_SECONDS = 3.0
FINAL = ("succeeded", "failed")
NOT_PENDING = "https://tapsign.dev/problems/transaction-not-pending"


@dataclass
class Seen:
    """What the clients saw of one transaction."""

    id: UUID
    status_token: str
    expires_at: float
    abandoned: bool
    #: Every final status a client was told, in order (answer results and status calls).
    told: list[str] = field(default_factory=list)
    answers_accepted: int = 0
    answers_retried: int = 0


@dataclass
class Report:
    cycles: int = 0
    in_flight_at_kills: list[int] = field(default_factory=list)
    transactions: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    connection_errors: int = 0
    answers_retried: int = 0
    replays_refused: int = 0
    callbacks: int = 0
    callback_duplicates: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        flights = self.in_flight_at_kills
        return [
            f"crash cycles:          {self.cycles} (SIGKILL, then restart)",
            f"in flight at the kills: {flights} (total {sum(flights)})",
            f"transactions:          {self.transactions} "
            + ", ".join(f"{name} {count}" for name, count in sorted(self.outcomes.items())),
            f"connection errors seen by clients: {self.connection_errors}",
            f"answers retried after a lost response: {self.answers_retried}, of which "
            f"{self.replays_refused} were refused as already answered",
            f"callbacks received:    {self.callbacks}, every event "
            f"({self.callback_duplicates} delivered twice: at least once, by design)",
            f"problems:              {len(self.problems)}",
            *(f"  - {problem}" for problem in self.problems),
        ]


#: Several hosts: how often each sweeps for the operations of a host that is down.
SWEEP_SECONDS = 1.0


class Crashtest:
    def __init__(
        self,
        directory: Path,
        *,
        clients: int,
        expiry: int,
        seed: int,
        hosts: int = 1,
        database_url: str | None = None,
    ) -> None:
        self.directories = (
            [directory] if hosts == 1 else [directory / f"host-{n}" for n in range(hosts)]
        )
        self.database_url = database_url
        self.clients = clients
        self.expiry = expiry
        self.random = random.Random(seed)
        self.receiver = Receiver()
        self.ports = [free_port() for _ in range(hosts)]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.url = self.urls[0]
        self.seen: dict[UUID, Seen] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.report = Report()
        #: ``(killed at, ready again at)`` of every crash.
        self.downtimes: list[tuple[float, float]] = []

    # -- the run ------------------------------------------------------------------------

    def run(self, cycles: int, *, between: tuple[float, float]) -> Report:
        with receiving(self.receiver):
            # The receiver listens on the loopback interface.
            config = "[callbacks]\nallow_private_networks = true\n"
            if len(self.urls) > 1:
                assert self.database_url is not None, "several hosts share a PostgreSQL database"
                config = (
                    database_config(self.database_url)
                    + '[server]\npublic_url = "https://tapsign.test"\n'
                    + f"[operations]\nsweep_seconds = {SWEEP_SECONDS}\n"
                    + config
                    + "lease_seconds = 3\n"
                )
            self.access_key = prepare(
                self.directories[0], config=config, callback_url=self.receiver.url()
            )
            for directory in self.directories[1:]:
                directory.mkdir()
                (directory / "tapsign.toml").write_text(config + shared_token(self.directories[0]))
            servers = [
                start(directory, port)
                for directory, port in zip(self.directories, self.ports, strict=True)
            ]
            try:
                phones = self._enrol()
                workers = [
                    threading.Thread(
                        target=self._transact, args=(number, phone, username), daemon=True
                    )
                    for number, (phone, username) in enumerate(phones)
                ]
                for worker in workers:
                    worker.start()
                for cycle in range(cycles):
                    time.sleep(self.random.uniform(*between))
                    host = cycle % len(servers)
                    servers[host] = self._crash(host, servers[host])
                time.sleep(between[0])  # some traffic after the last restart
                self.stop.set()
                for worker in workers:
                    worker.join(timeout=120)
                for phone, _ in phones:
                    phone.close()
                self._check()
            finally:
                for server in servers:
                    server.terminate()
                    server.wait(timeout=30)
        return self.report

    def _crash(self, host: int, server: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        with self.lock:
            killed_at = time.time()
            in_flight = sum(
                1 for seen in self.seen.values() if not seen.told and seen.expires_at > killed_at
            )
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        self.report.cycles += 1
        self.report.in_flight_at_kills.append(in_flight)
        restarted = start(self.directories[host], self.ports[host])
        self.downtimes.append((killed_at, time.time()))
        return restarted

    # -- the clients --------------------------------------------------------------------

    def _enrol(self) -> list[tuple[Device, str]]:
        phones = []
        with Client(self.url, self.access_key) as client:
            for number in range(self.clients):
                username = f"crash-{number}"
                phone = Device(self._phone_url(number))
                started = client.enroll(username=username)
                phone.enroll(started.enrollment.app_link_uri)
                with self.lock:
                    self.seen[started.enrollment.transaction_id] = Seen(
                        id=started.enrollment.transaction_id,
                        status_token=started.enrollment.status_token,
                        expires_at=time.time(),
                        abandoned=False,
                        told=["succeeded"],
                        answers_accepted=1,
                    )
                phones.append((phone, username))
        return phones

    def _phone_url(self, number: int) -> str:
        """Client ``number``'s phone talks to the host after its backend's."""
        return self.urls[(number + 1) % len(self.urls)]

    def _transact(self, number: int, phone: Device, username: str) -> None:
        backend = self.urls[number % len(self.urls)]
        with Client(backend, self.access_key, timeout=15) as client:
            while not self.stop.is_set():
                try:
                    self._one(client, phone, username)
                except (httpx.TransportError, ApiError) as exc:
                    pause = _retry_after(exc)
                    if pause is None:  # a refusal no client should get: the run fails
                        with self.lock:
                            where = traceback.extract_tb(exc.__traceback__)[1]
                            self.report.problems.append(
                                f"{username}: {exc!r} at line {where.lineno}: {where.line}"
                            )
                        return
                    with self.lock:
                        self.report.connection_errors += isinstance(exc, httpx.TransportError)
                    time.sleep(pause)

    def _one(self, client: Client, phone: Device, username: str) -> None:
        abandoned = self.random.random() < 0.1
        payment = self.random.random() < 0.5
        fields: dict[str, Any] = {"expires_in": self.expiry, "message": "Crash test"}
        if payment:
            fields |= {
                "amount": f"{self.random.randint(1, 5000)}.00",
                "currency": "EUR",
                "payee": Payee(name="Shop", account="DE89370400440532013000"),
            }
        started = client.approve(username=username, **fields)
        seen = Seen(
            id=started.transaction_id,
            status_token=started.status_token,
            expires_at=time.time() + self.expiry,
            abandoned=abandoned,
        )
        with self.lock:
            self.seen[seen.id] = seen
        if abandoned:
            return
        operation = None
        while operation is None and time.time() < seen.expires_at:
            operation = next((op for op in self._pending(phone) if op.id == seen.id), None)
            if operation is None:
                time.sleep(0.1)  # as a phone that polls; the push would come here
        if operation is None:
            return
        while time.time() < seen.expires_at:
            try:
                result = phone.approve(operation)
            except (httpx.TransportError, ApiError) as exc:
                pause = _retry_after(exc)
                if pause is None and isinstance(exc, ApiError) and exc.problem_type == NOT_PENDING:
                    # The answer sent before was stored (or the transaction has ended).
                    with self.lock:
                        self.report.replays_refused += seen.answers_retried > 0
                    break
                if pause is None:
                    raise
                seen.answers_retried += 1
                time.sleep(pause)
                continue
            seen.answers_accepted += 1
            if result.status in FINAL:
                seen.told.append(result.status)
            break
        while time.time() < seen.expires_at + 30:
            try:
                status = client.status(seen.status_token, wait=5)
            except (httpx.TransportError, ApiError) as exc:
                pause = _retry_after(exc)
                if pause is None:
                    raise
                time.sleep(pause)
                continue
            if status.status in FINAL:
                seen.told.append(status.status)
                return

    def _pending(self, phone: Device) -> list[wire.DeviceOperation]:
        try:
            return phone.pending()
        except (httpx.TransportError, ApiError) as exc:
            pause = _retry_after(exc)
            if pause is None:
                raise
            time.sleep(pause)
            return []

    # -- the checks ---------------------------------------------------------------------

    def _check(self) -> None:
        report = self.report
        latest = max(seen.expires_at for seen in self.seen.values())
        time.sleep(max(0.0, latest + EXPIRY_GRACE_SECONDS - time.time()))
        final: dict[UUID, tuple[str, str | None, float]] = {}
        with Client(self.url, self.access_key) as client:
            for seen in self.seen.values():
                now = client.transaction(seen.id)
                assert now.last_updated_at is not None
                final[seen.id] = (now.status, now.reason, now.last_updated_at.timestamp())
        report.transactions = len(self.seen)
        for seen in self.seen.values():
            status, reason, updated = final[seen.id]
            report.outcomes[reason or status] += 1
            report.answers_retried += seen.answers_retried
            if "succeeded" in seen.told and status != "succeeded":
                report.problems.append(f"{seen.id}: told succeeded, now {status} ({reason})")
            if len(set(seen.told) | ({status} if status in FINAL else set())) > 1:
                report.problems.append(f"{seen.id}: seen as {seen.told}, now {status}")
            if seen.answers_accepted > 1:
                report.problems.append(f"{seen.id}: {seen.answers_accepted} answers accepted")
            if status == "pending":
                report.problems.append(f"{seen.id}: still pending after its expiry")
            if reason == "expired" and updated > self._due(seen.expires_at):
                late = updated - seen.expires_at
                report.problems.append(f"{seen.id}: expired {late:.1f} s after its time")
            if seen.abandoned and reason != "expired":
                report.problems.append(f"{seen.id}: unanswered, yet {status} ({reason})")
        self._check_callbacks(final)

    def _due(self, expires_at: float) -> float:
        """When an expiry must have happened: its time, or the restart after it if the
        server was down then, plus the grace period. With several hosts one is always up,
        and expires what the one that is down held within two sweeps."""
        if len(self.urls) > 1:
            return expires_at + 2 * SWEEP_SECONDS + EXPIRY_GRACE_SECONDS
        due = expires_at
        for killed, ready in self.downtimes:
            if killed <= expires_at <= ready:
                due = ready
        return due + EXPIRY_GRACE_SECONDS

    def _check_callbacks(self, final: dict[UUID, tuple[str, str | None, float]]) -> None:
        deadline = time.time() + 60
        while True:
            deliveries: Counter[str] = Counter()
            reported: dict[UUID, str] = {}
            for received in list(self.receiver.received):
                document = json.loads(received.body)
                deliveries[received.headers["tapsign-delivery"]] += 1
                if document["event"].startswith("transaction."):
                    reported[UUID(document["transactionId"])] = document["status"]
            # Callbacks name the end itself: the API's "failed" with reason "expired" or
            # "cancelled" is the callback's "expired" or "cancelled".
            ends = {
                identifier: reason if reason in ("expired", "cancelled") else status
                for identifier, (status, reason, _) in final.items()
            }
            missing = [
                identifier for identifier, end in ends.items() if reported.get(identifier) != end
            ]
            if not missing or time.time() > deadline:
                break
            time.sleep(0.5)
        self.report.callbacks = sum(deliveries.values())
        self.report.callback_duplicates = sum(count - 1 for count in deliveries.values())
        for identifier in missing:
            self.report.problems.append(
                f"{identifier}: ended {ends[identifier]}, callback says "
                f"{reported.get(identifier, 'nothing')}"
            )


def _retry_after(exc: httpx.TransportError | ApiError) -> float | None:
    """How long a client waits before trying again after ``exc``; None: it does not."""
    if isinstance(exc, httpx.TransportError):
        return 0.2  # the server is down or restarting
    if exc.status == 429 or exc.status >= 500:
        return exc.retry_after or 0.2
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="kills and restarts")
    parser.add_argument("--clients", type=int, default=8, help="phone-and-backend pairs")
    parser.add_argument("--min-gap", type=float, default=1.0, help="least seconds between kills")
    parser.add_argument("--max-gap", type=float, default=5.0, help="most seconds between kills")
    parser.add_argument("--expiry", type=int, default=15, help="transaction lifetime, seconds")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--hosts", type=int, default=1, help="servers on one database")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL for several hosts, e.g. postgresql+psycopg://root@127.0.0.1/test "
        "(a scratch schema in it)",
    )
    options = parser.parse_args()
    if options.hosts > 1 and options.database_url is None:
        parser.error("several --hosts share PostgreSQL: give --database-url")
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**32)
    print(
        f"==> crash test: {options.cycles} cycles, {options.clients} clients, "
        f"{options.hosts} host(s), seed {seed}"
    )
    with (
        tempfile.TemporaryDirectory(prefix="tapsign-crash-") as directory,
        scratch_schema(options.database_url) as database,
    ):
        test = Crashtest(
            Path(directory),
            clients=options.clients,
            expiry=options.expiry,
            seed=seed,
            hosts=options.hosts,
            database_url=database,
        )
        report = test.run(options.cycles, between=(options.min_gap, options.max_gap))
    print("\n".join(report.lines()))
    sys.exit(1 if report.problems else 0)


if __name__ == "__main__":
    main()
