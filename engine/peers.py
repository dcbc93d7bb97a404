"""Telling the other processes on this host that an operation changed.

With ``tapsign serve --workers N`` every worker process runs its own engine on the shared
database, and a transaction's requests land on whichever process the kernel hands the
connection to. A relying party may be long-polling in process A while the phone's answer
is stored by process B; A must hear of it at once, not when the long-poll times out.

Each engine binds a Unix datagram socket in ``peers_dir`` (created 0700). After it stores a
change of an operation it sends ``(operation id, version)``, 24 bytes, to every other
socket in the directory. A receiver takes a notice only as a hint to read the operation
from the database again (engine/actors.py): a forged or stale notice costs one read and
can change nothing. Sending never blocks: a notice a full receiver cannot take is dropped,
and that receiver's long-poll ends at its timeout as it would have without this. A socket
whose process is gone refuses the notice and is removed.

Processes on other hosts are not reached; see docs/discussion/design.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import UUID

import msgspec
import trio

from tapsign_sdk.problems import ConfigurationError

log = logging.getLogger(__name__)

_NOTICE = struct.Struct("!16sQ")
#: sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
_MAX_PATH = 107

OnChange = Callable[[UUID, int], None]


class PeerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    sent: int
    dropped: int
    received: int


class Peers:
    """This process's socket in ``directory``, or nothing at all when ``directory`` is None."""

    def __init__(self, directory: str | None) -> None:
        self._directory = None if directory is None else Path(directory)
        self._path: Path | None = None
        self._sender: socket.socket | None = None
        self._sent = 0
        self._dropped = 0
        self._received = 0

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(sent=self._sent, dropped=self._dropped, received=self._received)

    async def run(
        self, on_change: OnChange, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Receive notices and pass them to ``on_change`` until cancelled."""
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
            task_status.started()
            while True:
                data = await receiver.recv(_NOTICE.size + 1)
                if len(data) != _NOTICE.size:
                    continue
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
        if self._sender is None or self._directory is None or self._path is None:
            return
        sent, dropped = _announce(
            self._sender, self._directory, operation_id, version, own=os.fspath(self._path)
        )
        self._sent += sent
        self._dropped += dropped


def announce_to(directory: str, changes: Iterable[tuple[UUID, int]]) -> None:
    """Tell the processes serving in ``directory`` that these operations changed, from a
    process that does not serve (``tapsign users deactivate``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for operation_id, version in changes:
            _announce(sender, Path(directory), operation_id, version, own=None)


def _announce(
    sender: socket.socket, directory: Path, operation_id: UUID, version: int, *, own: str | None
) -> tuple[int, int]:
    """Send the notice to every socket in ``directory`` but ``own``: ``(sent, dropped)``."""
    notice = _NOTICE.pack(operation_id.bytes, version)
    try:
        peers = [entry.path for entry in os.scandir(directory)]
    except OSError as exc:
        log.warning("cannot list the peers in %s: %s", directory, exc.strerror)
        return 0, 0
    sent = dropped = 0
    for peer in peers:
        if not peer.endswith(".sock") or peer == own:
            continue
        try:
            sender.sendto(notice, peer)
            sent += 1
        except BlockingIOError:
            dropped += 1
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(OSError):
                os.unlink(peer)  # its process is gone
        except OSError as exc:
            dropped += 1
            log.warning("cannot notify %s: %s", peer, exc.strerror)
    return sent, dropped
