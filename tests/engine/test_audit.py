"""The hash-chained audit trail notices edits, removals, reorderings and truncation."""

from __future__ import annotations

from functools import partial

import pytest
import sqlalchemy as sa
import trio

from engine import audit
from engine import statements as db
from engine.identity import Identity
from engine.schema import audit_log
from engine.store import Store


async def problems(store: Store) -> list[str]:
    entries, head_seq, head_hash = await store.read(db.read_audit)
    return audit.verify_chain(entries, head_seq=head_seq, head_hash=head_hash)


@pytest.fixture
async def trail(store: Store) -> Store:
    identity = Identity(store)
    user = await identity.create_user("frank", {"a": "1"}, actor="admin")
    await identity.update_attributes(user.id, set_attributes={"b": "2"}, actor="admin")
    await identity.lock_user(user.id, actor="admin")
    await identity.unlock_user(user.id, actor="admin")
    assert await problems(store) == []
    return store


def tamper(store: Store, statement: sa.Executable) -> None:
    with store.transaction(write=True) as connection:
        connection.execute(statement)


async def test_an_edited_entry_is_found(trail: Store) -> None:
    tamper(trail, audit_log.update().where(audit_log.c.seq == 2).values(actor="someone else"))
    assert await problems(trail) == ["entry 2 was altered"]


async def test_a_removed_entry_is_found(trail: Store) -> None:
    tamper(trail, audit_log.delete().where(audit_log.c.seq == 2))
    assert await problems(trail) == [
        "entry 3 found where entry 2 was expected",
        "entry 3 does not follow the entry before it",
    ]


async def test_reordered_entries_are_found(trail: Store) -> None:
    tamper(trail, audit_log.update().where(audit_log.c.seq == 2).values(seq=99))
    tamper(trail, audit_log.update().where(audit_log.c.seq == 3).values(seq=2))
    tamper(trail, audit_log.update().where(audit_log.c.seq == 99).values(seq=3))
    found = await problems(trail)
    assert "entry 2 was altered" in found
    assert "entry 2 does not follow the entry before it" in found


async def test_a_truncated_tail_is_found(trail: Store) -> None:
    tamper(trail, audit_log.delete().where(audit_log.c.seq == 4))
    assert await problems(trail) == ["the trail ends at entry 3, the head says 4"]


async def test_concurrent_appends_keep_one_chain(store: Store) -> None:

    identity = Identity(store)
    async with trio.open_nursery() as nursery:
        for index in range(20):
            nursery.start_soon(partial(identity.create_user, f"user{index}", actor="admin"))
    entries, head, _ = await store.read(db.read_audit)
    assert [entry.seq for entry in entries] == list(range(1, 21))
    assert head == 20
    assert await problems(store) == []
