"""Telling the other processes that an operation changed: over Unix datagram sockets between
the processes of one host on SQLite (:class:`Peers`), over PostgreSQL's ``LISTEN/NOTIFY``
between every process of every host on PostgreSQL (:class:`PostgresNotices`). Both are
:class:`Notices`, and both only hint: a receiver reads the operation again.

With ``tapsign serve --workers N`` every worker process runs its own engine on the shared
database, and a transaction's requests land on whichever process the kernel hands the
connection to. A relying party may be long-polling in process A while the phone's answer
is stored by process B; A must hear of it at once, not when the long-poll times out.

Each engine binds a Unix datagram socket in ``peers_dir`` (created 0700). After it stores a
change of an operation it sends ``(operation id, version)``, 24 bytes, to every other
socket in the directory. A receiver takes a notice only as a hint to read the operation
from the database again (engine/actors.py): a forged or stale notice costs one read and
can change nothing. Sending never blocks: a notice a full receiver cannot take is dropped,
and the sender owes that receiver a *resync* notice (the nil id), which it sends with its
next notice or within ``RESYNC_SECONDS``, once the receiver has room again; a receiver told
so reads the versions of every operation it holds in one query and refreshes those that
moved (``on_lost``). A socket whose process is gone refuses the notice and is removed.

On PostgreSQL a change is announced by ``pg_notify`` in the very transaction that stores it
(engine/statements.py ``notify_changed``), so it is delivered when it commits and never
if it rolls back, to every process of every host listening on the database: each holds
one listening connection, woken in Trio when its socket becomes readable. A notice is
lost only with that connection: after reconnecting, the process reads the versions of
every operation it holds in one query and refreshes those that moved (``on_lost``).

A second kind of notice says that an access key, device or user changed status (revoked,
locked, unlocked, deactivated, deleted): every process then empties its short-lived caches
of them (``on_records``; engine/recent.py). On PostgreSQL the storing transaction sends it
(engine/statements.py ``notify_records_changed``), whoever stores it, a server or a
``tapsign`` command; on SQLite the changing process sends it to the sockets. A process
that may have missed notices (``on_lost``) empties them too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol
from uuid import UUID

import msgspec
import psycopg
import sqlalchemy as sa
import trio

from engine.statements import CHANGES_CHANNEL, OUTBOX_WAITING, RECORDS_CHANGED
from tapsign_sdk.problems import ConfigurationError

log = logging.getLogger(__name__)

_NOTICE = struct.Struct("!16sQ")
#: sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
_MAX_PATH = 107

OnChange = Callable[[UUID, int], None]
#: Called when an access key, device or user changed status somewhere, and when callbacks
#: nobody holds wait in the outbox.
OnRecords = Callable[[], None]
OnOutbox = Callable[[], None]
#: Called when notices may have been lost: read what moved meanwhile.
OnLost = Callable[[], Awaitable[None]]
#: Seconds between attempts to listen again after the connection was lost.
RECONNECT_SECONDS = 1.0
#: Seconds between attempts to tell a receiver that missed a notice to read what moved.
RESYNC_SECONDS = 0.5
#: The notice that says "you missed one: read everything you hold again".
_RESYNC = _NOTICE.pack(UUID(int=0).bytes, 0)
#: The notice that says "an access key, device or user changed status: forget what you
#: cached of them" (engine/statements.py ``notify_records_changed`` on PostgreSQL).
_RECORDS = _NOTICE.pack(UUID(int=1).bytes, 0)
#: The notice that says "callbacks nobody holds wait: claim them" (a command wrote them;
#: engine/statements.py ``notify_outbox_waiting`` on PostgreSQL).
_OUTBOX = _NOTICE.pack(UUID(int=2).bytes, 0)


class PeerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    sent: int
    dropped: int
    received: int
    #: Times notices may have been lost and what moved was read again.
    resynced: int = 0


class Notices(Protocol):
    """How a process tells the others that an operation changed, and hears of theirs."""

    #: This process's name in notices (it ignores its own).
    origin: str

    def announce(self, operation_id: UUID, version: int) -> None: ...

    def announce_records(self) -> None:
        """Tell the others that an access key, device or user this process changed has a
        new status (on PostgreSQL the storing transaction did)."""

    async def run(
        self,
        on_change: OnChange,
        on_lost: OnLost,
        on_records: OnRecords = lambda: None,
        on_outbox: OnOutbox = lambda: None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None: ...

    def statistics(self) -> PeerStatistics: ...


class Peers:
    """This process's socket in ``directory``, or nothing at all when ``directory`` is None."""

    def __init__(self, directory: str | None) -> None:
        self.origin = secrets.token_hex(8)
        self._directory = None if directory is None else Path(directory)
        self._path: Path | None = None
        self._sender: socket.socket | None = None
        #: The receivers that missed a notice and are not yet told so.
        self._owed: set[str] = set()
        self._sent = 0
        self._dropped = 0
        self._received = 0
        self._resynced = 0

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(
            sent=self._sent, dropped=self._dropped, received=self._received, resynced=self._resynced
        )

    async def run(
        self,
        on_change: OnChange,
        on_lost: OnLost,
        on_records: OnRecords = lambda: None,
        on_outbox: OnOutbox = lambda: None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Receive notices and pass them to ``on_change`` until cancelled, ``on_lost``
        when a sender says that it dropped one for this process, ``on_records`` when one
        says that an access key, device or user changed status, and ``on_outbox`` when a
        command says that it wrote callbacks nobody holds."""
        if self._directory is None:
            task_status.started()
            return
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self._directory / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        if len(os.fsencode(path)) > _MAX_PATH:
            raise ConfigurationError(
                f"peers_dir {self._directory} is too long for a Unix socket path"
            )
        receiver = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        try:
            await receiver.bind(os.fspath(path))
            self._path, self._sender = path, sender
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._settle_debts)
                task_status.started()
                while True:
                    data = await receiver.recv(_NOTICE.size + 1)
                    if data == _RESYNC:
                        self._resynced += 1
                        await on_lost()
                    elif data == _RECORDS:
                        on_records()
                    elif data == _OUTBOX:
                        on_outbox()
                    elif len(data) == _NOTICE.size:
                        raw, version = _NOTICE.unpack(data)
                        self._received += 1
                        on_change(UUID(bytes=raw), version)
        finally:
            self._path = self._sender = None
            receiver.close()
            sender.close()
            with contextlib.suppress(OSError):
                path.unlink()

    def announce(self, operation_id: UUID, version: int) -> None:
        """Tell every other process here that ``operation_id`` is now at ``version``."""
        self._send(_NOTICE.pack(operation_id.bytes, version))

    def announce_records(self) -> None:
        self._send(_RECORDS)

    def _send(self, notice: bytes) -> None:
        if self._sender is None or self._directory is None or self._path is None:
            return
        self._tell_owed()
        sent, dropped = _announce(self._sender, self._directory, notice, own=os.fspath(self._path))
        self._sent += sent
        self._dropped += len(dropped)
        self._owed.update(dropped)

    async def _settle_debts(self) -> None:
        while True:
            await trio.sleep(RESYNC_SECONDS)
            self._tell_owed()

    def _tell_owed(self) -> None:
        """Tell each receiver that missed a notice to read what moved, once it has room."""
        if self._sender is None:
            return
        for peer in list(self._owed):
            try:
                self._sender.sendto(_RESYNC, peer)
            except BlockingIOError:
                continue  # still full: told later
            except OSError:
                pass  # gone: nothing to tell
            self._owed.discard(peer)


class PostgresNotices:
    """Notices between every process on one PostgreSQL database (see the module docstring).
    The notices themselves are sent by the transactions that store the changes."""

    def __init__(self, database_url: str) -> None:
        self.origin = secrets.token_hex(8)
        url = sa.make_url(database_url).set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._sent = 0
        self._received = 0
        self._resynced = 0
        #: The server process of the listening connection, while there is one.
        self.listener_pid: int | None = None

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(
            sent=self._sent, dropped=0, received=self._received, resynced=self._resynced
        )

    def announce(self, operation_id: UUID, version: int) -> None:
        """Counted only: the transaction that stored the change sent its notice."""
        self._sent += 1

    def announce_records(self) -> None:
        """Nothing: the transaction that stored the change sent its notice."""

    async def run(
        self,
        on_change: OnChange,
        on_lost: OnLost,
        on_records: OnRecords = lambda: None,
        on_outbox: OnOutbox = lambda: None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled; after a lost connection, listen again and ``on_lost``."""
        connection = await trio.to_thread.run_sync(self._listen)
        task_status.started()
        while True:
            try:
                await self._receive(connection, on_change, on_records, on_outbox)
            except (psycopg.Error, OSError) as exc:
                log.warning("lost the PostgreSQL connection that listens for changes: %s", exc)
            finally:
                self.listener_pid = None
                connection.close()
            while True:
                await trio.sleep(RECONNECT_SECONDS)
                try:
                    connection = await trio.to_thread.run_sync(self._listen)
                    break
                except psycopg.Error as exc:
                    log.warning("cannot listen for changes on PostgreSQL: %s", exc)
            self._resynced += 1
            await on_lost()

    def _listen(self) -> psycopg.Connection[tuple[object, ...]]:
        connection = psycopg.connect(self._conninfo, autocommit=True)
        connection.execute(f"LISTEN {CHANGES_CHANNEL}")
        self.listener_pid = connection.info.backend_pid
        return connection

    async def _receive(
        self,
        connection: psycopg.Connection[tuple[object, ...]],
        on_change: OnChange,
        on_records: OnRecords,
        on_outbox: OnOutbox,
    ) -> None:
        pgconn = connection.pgconn
        while True:
            await trio.lowlevel.wait_readable(connection.fileno())
            pgconn.consume_input()  # psycopg.OperationalError once the connection is gone
            while (notice := pgconn.notifies()) is not None:
                if notice.extra == RECORDS_CHANGED.encode():
                    on_records()  # this process's own changes too: its caches go as well
                    continue
                if notice.extra == OUTBOX_WAITING.encode():
                    on_outbox()
                    continue
                try:
                    raw, version, origin = notice.extra.decode().split(":")
                    operation_id, stored = UUID(hex=raw), int(version)
                except ValueError:
                    continue  # not ours: ignored, as a stray datagram is
                if origin != self.origin:
                    self._received += 1
                    on_change(operation_id, stored)


def announce_to(directory: str, changes: Iterable[tuple[UUID, int]]) -> None:
    """Tell the processes serving in ``directory`` that these operations changed, from a
    process that does not serve (``tapsign users deactivate``), and that the callbacks it
    wrote wait to be claimed. A receiver too full to take one is told to read everything
    again, blocking up to a second for it to have room."""
    notices = [_NOTICE.pack(operation_id.bytes, version) for operation_id, version in changes]
    _announce_from_outside(directory, [*notices, _OUTBOX] if notices else [])


def announce_records_to(directory: str) -> None:
    """Tell the processes serving in ``directory`` that an access key, device or user
    changed status, from a process that does not serve (``tapsign keys revoke`` …)."""
    _announce_from_outside(directory, [_RECORDS])


def _announce_from_outside(directory: str, notices: Iterable[bytes]) -> None:
    owed: set[str] = set()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for notice in notices:
            owed.update(_announce(sender, Path(directory), notice, own=None)[1])
        sender.settimeout(1.0)
        for peer in owed:
            with contextlib.suppress(OSError):
                sender.sendto(_RESYNC, peer)


def _announce(
    sender: socket.socket, directory: Path, notice: bytes, *, own: str | None
) -> tuple[int, set[str]]:
    """Send ``notice`` to every socket in ``directory`` but ``own``: how many took it, and
    the sockets that could not."""
    try:
        peers = [entry.path for entry in os.scandir(directory)]
    except FileNotFoundError:
        return 0, set()  # nobody serves here (or on PostgreSQL, which has no peers_dir)
    except OSError as exc:
        log.warning("cannot list the peers in %s: %s", directory, exc.strerror)
        return 0, set()
    sent, dropped = 0, set()
    for peer in peers:
        if not peer.endswith(".sock") or peer == own:
            continue
        try:
            sender.sendto(notice, peer)
            sent += 1
        except BlockingIOError:
            dropped.add(peer)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(peer)  # its process is gone
        except OSError as exc:
            dropped.add(peer)
            log.warning("cannot notify %s: %s", peer, exc.strerror)
    return sent, dropped
