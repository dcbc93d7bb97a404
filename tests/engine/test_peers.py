"""The notices between processes on one host (engine/peers.py), over real Unix sockets."""

from __future__ import annotations

import functools
import socket
import stat
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import trio

from engine.peers import RESYNC_SECONDS, Peers
from tapsign_sdk.problems import ConfigurationError


async def nothing_lost() -> None:
    """Nothing overflows in these tests but the one that says so."""
    raise AssertionError("told to resync, but no notice was dropped")


async def test_a_notice_reaches_every_other_process_but_not_the_sender(tmp_path: Path) -> None:
    directory = tmp_path / "peers"
    heard: dict[str, list[tuple[UUID, int]]] = {"a": [], "b": [], "c": []}
    both = trio.Event()

    def hear(name: str, operation_id: UUID, version: int) -> None:
        heard[name].append((operation_id, version))
        if heard["b"] and heard["c"]:
            both.set()

    peers = {name: Peers(str(directory)) for name in heard}
    operation = uuid4()
    async with trio.open_nursery() as nursery:
        for name, peer in peers.items():
            await nursery.start(peer.run, functools.partial(hear, name), nothing_lost)
        peers["a"].announce(operation, 7)
        with trio.fail_after(10):  # a lost notice fails the test instead of hanging it
            await both.wait()
        nursery.cancel_scope.cancel()
    assert heard == {"a": [], "b": [(operation, 7)], "c": [(operation, 7)]}
    assert peers["a"].statistics().sent == 2
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert list(directory.iterdir()) == []  # each removed its socket on the way out


async def test_a_dead_process_socket_is_removed_and_garbage_is_ignored(tmp_path: Path) -> None:
    directory = tmp_path / "peers"
    heard: list[tuple[UUID, int]] = []
    arrived = trio.Event()

    def hear(operation_id: UUID, version: int) -> None:
        heard.append((operation_id, version))
        arrived.set()

    peer, sender = Peers(str(directory)), Peers(str(directory))
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run, hear, nothing_lost)
        listening = next(directory.iterdir())
        dead = directory / "1-dead.sock"
        orphan = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        orphan.bind(str(dead))
        orphan.close()  # the file stays and nobody listens: a crashed process
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as forger:
            forger.sendto(b"not a notice", str(listening))
        await nursery.start(sender.run, hear, nothing_lost)
        operation = uuid4()
        sender.announce(operation, 2)  # after the garbage: datagrams arrive in order
        assert not dead.exists()
        with trio.fail_after(10):
            await arrived.wait()
        nursery.cancel_scope.cancel()
    assert heard == [(operation, 2)]
    assert peer.statistics().received == 1


async def test_no_directory_means_alone_and_a_too_long_one_is_refused(tmp_path: Path) -> None:
    alone = Peers(None)
    async with trio.open_nursery() as nursery:
        await nursery.start(alone.run, lambda *_: None, nothing_lost)
        alone.announce(uuid4(), 1)  # nobody to tell, nothing fails
    assert alone.statistics().sent == 0
    with pytest.raises(ConfigurationError, match="too long for a Unix socket path"):
        await Peers(str(tmp_path / ("x" * 120))).run(lambda *_: None, nothing_lost)


async def test_a_receiver_that_missed_notices_is_told_to_read_everything_again(
    tmp_path: Path,
) -> None:
    """A full receiver drops notices; its sender tells it so once it has room, and the
    receiver reads every operation it holds again (``on_lost``), exactly once."""
    directory = tmp_path / "peers"
    heard: list[tuple[UUID, int]] = []
    resyncs: list[int] = []
    told = trio.Event()

    async def lost() -> None:
        resyncs.append(len(heard))
        told.set()

    receiver, sender = Peers(str(directory)), Peers(str(directory))
    async with trio.open_nursery() as nursery:
        await nursery.start(receiver.run, lambda *notice: heard.append(notice), lost)
        await nursery.start(sender.run, lambda *_: None, nothing_lost)
        announced = 0
        while sender.statistics().dropped == 0:  # no checkpoint: the receiver cannot read
            announced += 1
            sender.announce(uuid4(), announced)
            assert announced < 100_000, "the receiver's buffer never filled"
        with trio.fail_after(10):
            await told.wait()
        await trio.sleep(2 * RESYNC_SECONDS)  # owed once, told once
        nursery.cancel_scope.cancel()
    dropped = sender.statistics().dropped
    assert dropped >= 1
    assert len(heard) == announced - dropped  # the rest was dropped, not garbled
    assert resyncs == [len(heard)]  # after what it did take: datagrams keep their order
    assert receiver.statistics().resynced == 1
