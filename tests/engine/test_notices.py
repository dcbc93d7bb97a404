"""Change notices between processes (engine/peers.py): two engines on one database, real
clock; on PostgreSQL nothing shared but the database (LISTEN/NOTIFY), on SQLite a peers
directory too."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from engine import statements as db
from engine.model import Phase, utc_now
from engine.peers import PostgresNotices, announce_records_to
from tests.engine.conftest import EngineFactory
from tests.engine.test_actors import enrol, start


@pytest.fixture
def on_postgresql(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    return database_url


async def test_a_long_poll_on_one_process_ends_when_another_stores_the_answer(
    engine_factory: EngineFactory, on_postgresql: str
) -> None:
    async with engine_factory() as first, engine_factory() as second:
        assert isinstance(first.peers, PostgresNotices)
        phone, user_id, _ = await enrol(first)
        operation = await start(first, user_id)
        woken = []

        async def wait() -> None:
            with trio.fail_after(10):  # far below the 30 s of a long-poll
                woken.append(await first.supervisor.wait(operation.id, version=operation.version))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            await second.supervisor.answer(operation.id, phone.answer(operation))
        assert [ended.phase for ended in woken] == [Phase.SUCCEEDED]
        assert first.peers.statistics().received == 1  # its own notices are not counted


async def test_after_a_lost_listening_connection_what_moved_is_read_again(
    engine_factory: EngineFactory, on_postgresql: str
) -> None:
    admin = sa.create_engine(on_postgresql)
    try:
        async with engine_factory() as first, engine_factory() as second:
            assert isinstance(first.peers, PostgresNotices)
            phone, user_id, _ = await enrol(first)
            operation = await start(first, user_id)  # its actor is in the first process
            listener = first.peers.listener_pid
            with admin.connect() as connection:
                connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": listener})
                with trio.fail_after(10):  # until that server process is gone
                    while connection.execute(  # noqa: ASYNC110 - PostgreSQL's state, polled
                        sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                        {"pid": listener},
                    ).scalar():
                        await trio.sleep(0.05)
            # Its notice reaches nobody in the first process...
            await second.supervisor.answer(operation.id, phone.answer(operation))
            # ...which listens again, reads what moved and ends its stale actor.
            with trio.fail_after(10):
                ended = await first.supervisor.wait(operation.id, version=operation.version)
            assert ended.phase is Phase.SUCCEEDED
            assert first.peers.statistics().resynced == 1
            assert first.peers.listener_pid not in (None, listener)
            assert first.supervisor.statistics().live_operations == 0
    finally:
        admin.dispose()


async def test_a_status_changed_anywhere_empties_every_process_caches(
    engine_factory: EngineFactory, database_url: str, tmp_path: Path
) -> None:
    """A device locked through one process, and an access key revoked by a command: every
    process's caches of access keys and devices forget what they hold at once (within
    milliseconds, not the second they would otherwise keep it)."""
    peers = str(tmp_path / "peers")
    async with engine_factory(peers_dir=peers) as first, engine_factory(peers_dir=peers) as second:
        forgot: Counter[str] = Counter()
        first.record_listeners.append(lambda: forgot.update(["first"]))
        second.record_listeners.append(lambda: forgot.update(["second"]))
        _, _, device_id = await enrol(first)
        forgot.clear()  # the enrolment changed no status; the test starts here

        async def until_second_forgot(times: int) -> None:
            with trio.fail_after(10):
                while forgot["second"] < times:  # noqa: ASYNC110 - set by the notice
                    await trio.sleep(0.01)

        await first.identity.lock_device(device_id, actor="test")
        assert forgot["first"] >= 1  # the changing process itself, before it returns
        await until_second_forgot(1)

        # ``tapsign keys revoke``: a command, not a serving process.
        with first.store.engine.begin() as connection:
            db.revoke_access_key(connection, "no-such-key", utc_now())
        if not database_url.startswith("postgresql"):
            announce_records_to(peers)  # on PostgreSQL the transaction told everyone
        await until_second_forgot(2)
