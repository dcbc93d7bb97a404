"""The store's grouped writer: many units, one transaction, each unit on its own."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
import trio.testing
from sqlalchemy.engine import Connection

from engine import audit
from engine import statements as db
from engine.errors import UsernameTaken
from engine.settings import DatabaseSettings
from engine.store import Store
from tapsign_sdk.problems import InvalidInput


async def test_units_commit_together_and_fail_alone(store: Store) -> None:
    now = datetime.now(UTC)

    def unit(index: int) -> object:
        def work(connection: Connection) -> int:
            db.append_audit(connection, at=now, actor="test", action=f"unit.{index}", outcome="ok")
            if index % 4 == 3:
                raise UsernameTaken(f"unit {index} fails")
            return index

        return work

    results: dict[int, object] = {}

    async def write(index: int) -> None:
        try:
            results[index] = await store.write(unit(index))  # type: ignore[arg-type]
        except UsernameTaken as exc:
            results[index] = str(exc)

    async with trio.open_nursery() as service:
        await service.start(store.run)
        async with trio.open_nursery() as writers:
            for index in range(16):
                writers.start_soon(write, index)
        service.cancel_scope.cancel()

    assert results == {i: (f"unit {i} fails" if i % 4 == 3 else i) for i in range(16)}
    statistics = store.statistics()
    assert statistics.grouped_writes == 16
    assert statistics.groups < 16  # grouped: fewer commits than units
    entries, head_seq, head_hash = await store.read(db.read_audit)
    # The failing units' audit entries went with their savepoints; the chain is whole.
    assert sorted(entry.action for entry in entries) == sorted(
        f"unit.{i}" for i in range(16) if i % 4 != 3
    )
    assert audit.verify_chain(entries, head_seq=head_seq, head_hash=head_hash) == []


async def test_writes_without_the_writer_run_one_by_one(store: Store) -> None:
    now = datetime.now(UTC)
    await store.write(lambda c: db.append_audit(c, at=now, actor="t", action="a", outcome="ok"))
    assert store.statistics().groups == 0
    entries, head_seq, _ = await store.read(db.read_audit)
    assert (len(entries), head_seq) == (1, 1)


async def test_a_stopped_writer_fails_what_waits(store: Store) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        nursery.cancel_scope.cancel()
    # Stopped: back to unit-by-unit writes.
    assert await store.write(lambda connection: 7) == 7


async def test_a_value_the_database_cannot_store_is_invalid_input_not_a_crash(
    store: Store,
) -> None:
    """PostgreSQL refuses NUL in text; SQLite stores it. Either way the caller gets an
    answer it can act on, grouped or not, and the writer goes on."""
    now = datetime.now(UTC)

    def work(connection: Connection) -> None:
        db.append_audit(connection, at=now, actor="nul\x00actor", action="a", outcome="ok")

    async def attempt() -> str:
        try:
            await store.write(work)
        except InvalidInput as exc:
            return f"refused: {exc}"
        return "stored"

    alone = await attempt()
    async with trio.open_nursery() as service:
        await service.start(store.run)
        grouped = await attempt()
        await store.write(lambda c: db.append_audit(c, at=now, actor="t", action="b", outcome="ok"))
        service.cancel_scope.cancel()
    if store.sqlite:
        assert (alone, grouped) == ("stored", "stored")
    else:
        assert alone == grouped
        assert alone.startswith("refused: a value cannot be stored")


def test_sqlite_writers_of_all_processes_take_turns_on_the_lock_file(tmp_path: Path) -> None:
    """A write transaction holds ``<database>.writer-lock``: another process (another open
    file, another store) waits in the kernel instead of polling SQLite's lock; reads do not
    take it."""
    url = f"sqlite:///{tmp_path / 'tapsign.db'}"
    store, other = Store(DatabaseSettings(url=url)), Store(DatabaseSettings(url=url))
    store.migrate()
    lock = tmp_path / "tapsign.db.writer-lock"
    now = datetime.now(UTC)

    def held() -> bool:
        descriptor = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)
        return False

    seen: list[bool] = []
    order: list[str] = []

    def first(connection: Connection) -> None:
        seen.append(held())
        db.append_audit(connection, at=now, actor="t", action="first", outcome="ok")
        waiting.start()
        waiting.join(0.3)  # the other store's writer is blocked meanwhile
        seen.append(waiting.is_alive())
        order.append("first")

    def second(connection: Connection) -> None:
        db.append_audit(connection, at=now, actor="t", action="second", outcome="ok")
        order.append("second")

    waiting = threading.Thread(target=other._run, args=(second, True))
    with store.transaction(write=False) as connection:
        seen.append(held())  # a read does not take it
        db.read_audit(connection)
    store._run(first, True)
    waiting.join(30)
    assert seen == [False, True, True]
    assert order == ["first", "second"]
    entries, head_seq, head_hash = store._run(db.read_audit, False)
    assert [entry.action for entry in entries] == ["first", "second"]
    assert audit.verify_chain(entries, head_seq=head_seq, head_hash=head_hash) == []
    store.close()
    other.close()


async def test_a_one_time_token_is_consumed_once_in_grouped_writes(store: Store) -> None:
    """On PostgreSQL an INSERT's row count is -1 unless asked for: every token then looked
    used already (intent tokens refused, result tokens inactive)."""
    now = datetime.now(UTC)
    expires_at = now + timedelta(minutes=2)

    def consume(connection: Connection) -> bool:
        return db.consume_token(connection, "a-jti", now=now, expires_at=expires_at)

    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        taken: list[bool] = []

        async def take() -> None:
            taken.append(await store.write(consume))

        async with trio.open_nursery() as racing:
            racing.start_soon(take)
            racing.start_soon(take)
        nursery.cancel_scope.cancel()
    assert sorted(taken) == [False, True]
    assert await store.write(consume) is False


async def test_expired_one_time_tokens_are_purged_and_the_others_kept(store: Store) -> None:
    now = datetime.now(UTC)

    def consume(jti: str, expires_at: datetime) -> Callable[[Connection], bool]:
        return lambda connection: db.consume_token(
            connection, jti, now=now - timedelta(minutes=5), expires_at=expires_at
        )

    assert await store.write(consume("expired", now - timedelta(seconds=1)))
    assert await store.write(consume("current", now + timedelta(minutes=1)))
    await store.write(lambda connection: db.purge_consumed_tokens(connection, now=now))
    assert await store.write(consume("expired", now + timedelta(minutes=1)))  # forgotten
    assert not await store.write(consume("current", now + timedelta(minutes=1)))  # kept
