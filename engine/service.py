"""The engine as one service: store, identity, supervisor, callbacks and the verifier.

``Engine.run`` migrates the database, then starts, in one nursery, the store's grouped
writer, the batched verifier,
the callback deliverer (which queues what the outbox still holds), the supervisor
(which resumes the stored pending operations) and the socket on which other processes
announce changed operations (engine/peers.py). The API holds an ``Engine`` and talks to
``engine.identity`` for users and devices and to ``engine.supervisor`` for operations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

import httpx
import sqlalchemy as sa
import trio
from sqlalchemy.engine import Connection

from engine import audit
from engine import statements as db
from engine.actors import Context, Supervisor, cancel_pending_of_user
from engine.attestation import Attestor
from engine.callbacks import CallbackDeliverer
from engine.dispatch import WebhookDispatcher
from engine.identity import Identity, delete_user, set_user_status
from engine.model import Clock, Device, Operation, User, UserStatus, utc_now
from engine.peers import Notices, Peers, PostgresNotices
from engine.settings import EngineSettings
from engine.statements import Lease, OutboxItem
from engine.store import Store
from hsm.errors import HsmError
from hsm.keyring import KeyPurpose, Keyring
from hsm.tokens import TokenSigner
from hsm.verifier import BatchVerifier

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        settings: EngineSettings,
        *,
        keyring: Keyring,
        verifier: BatchVerifier,
        issuer: str,
        clock: Clock = utc_now,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.store = Store(settings.database)
        self.keyring = keyring
        self.verifier = verifier
        self.clock = clock
        self.identity = Identity(self.store, clock=clock, changed=self._status_changed_here)
        #: Called when an access key, device or user changed status, here or elsewhere:
        #: the API's caches of them (api/access.py, api/device_auth.py) forget everything.
        self.record_listeners: list[Callable[[], None]] = []
        # Every process of every host on PostgreSQL; the processes of this host on SQLite.
        self.peers: Notices = (
            PostgresNotices(settings.database.url)
            if sa.make_url(settings.database.url).get_backend_name() == "postgresql"
            else Peers(settings.peers_dir)
        )
        self.callbacks = CallbackDeliverer(
            self.store,
            keyring,
            settings.callbacks,
            origin=self.peers.origin,
            clock=clock,
            client=http_client,
        )
        self.supervisor = Supervisor(
            Context(
                store=self.store,
                keyring=keyring,
                verifier=verifier,
                attestor=Attestor(settings.attestation),
                consent=TokenSigner(keyring, KeyPurpose.CONSENT, issuer=issuer),
                tokens=TokenSigner(keyring, KeyPurpose.TOKEN, issuer=issuer),
                callbacks=self.callbacks,
                dispatcher=WebhookDispatcher(),
                peers=self.peers,
                settings=settings.operations,
                clock=clock,
            )
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled."""
        await trio.to_thread.run_sync(self.store.migrate)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.run)
                await nursery.start(self.verifier.run)
                await nursery.start(self.callbacks.run)
                await nursery.start(self.supervisor.run)
                await nursery.start(
                    self.peers.run,
                    self.supervisor.changed_elsewhere,
                    self._notices_lost,
                    self._forget_records,
                    self.callbacks.claim_soon,
                )
                nursery.start_soon(self._refresh_keys)
                task_status.started()
        finally:
            self.store.close()

    async def _refresh_keys(self) -> None:
        """Read the HSM's key list every few seconds: a key rotated or retired by another
        process (``tapsign hsm rotate``, ``retire``, another worker) is signed with, or no
        longer published and accepted, without a restart."""
        while True:
            await trio.sleep(self.settings.key_refresh_seconds)
            try:
                await trio.to_thread.run_sync(self.keyring.refresh)
            except HsmError as exc:
                log.warning("cannot read the HSM's key list, keeping the last one: %s", exc)

    async def deactivate_user(self, user_id: UUID, *, actor: str) -> User:
        """Deactivate the user and every device (final), and cancel what was pending."""
        user, cancelled = await end_user(
            self.store,
            user_id,
            delete=False,
            actor=actor,
            clock=self.clock,
            lease=self.callbacks.lease,
            origin=self.peers.origin,
        )
        self._took_effect(cancelled)
        assert user is not None  # noqa: S101 - a deactivation returns the user
        return user

    async def delete_user(self, user_id: UUID, *, actor: str) -> None:
        """Delete the user and the user's devices, and cancel what was pending."""
        _, cancelled = await end_user(
            self.store,
            user_id,
            delete=True,
            actor=actor,
            clock=self.clock,
            lease=self.callbacks.lease,
            origin=self.peers.origin,
        )
        self._took_effect(cancelled)

    def _took_effect(self, cancelled: list[tuple[Operation, list[OutboxItem]]]) -> None:
        for operation, items in cancelled:
            self.supervisor.changed_here(operation)
            self.callbacks.enqueue(items)
        self._forget_records()
        self.peers.announce_records()

    def _status_changed_here(self, record: User | Device) -> None:
        """A user or device changed status through this process: its actors judge with the
        new one, and no process keeps a cached copy."""
        self.supervisor.facts_changed(record)
        self._forget_records()
        self.peers.announce_records()

    async def _notices_lost(self) -> None:
        """Notices may have been lost: what moved is read again, and what was cached of
        access keys, devices and users is forgotten (a status may have changed)."""
        self._forget_records()
        await self.supervisor.resync()

    def _forget_records(self) -> None:
        for forget in self.record_listeners:
            forget()

    async def verify_audit(self) -> list[str]:
        """Problems found in the audit trail; empty when it is intact."""
        entries, head_seq, head_hash = await self.store.read(db.read_audit)
        return audit.verify_chain(entries, head_seq=head_seq, head_hash=head_hash)


async def end_user(
    store: Store,
    user_id: UUID,
    *,
    delete: bool,
    actor: str,
    clock: Clock,
    lease: Callable[[datetime], Lease] | None,
    origin: str = "",
) -> tuple[User | None, list[tuple[Operation, list[OutboxItem]]]]:
    """Deactivate (final) or delete a user, and cancel in the same transaction every
    operation the user had pending, with its callbacks: nothing started before can still be
    approved, whoever ends the user (the API, or ``tapsign users`` while a server runs).
    ``lease``: the caller's process's lease from a moment on the callbacks it will deliver; None for
    a command, whose callbacks a running server takes up (engine/callbacks.py). ``origin``:
    the calling process's name in notices (engine/peers.py; a command has none). Returns the
    deactivated user (None when deleted) and the cancelled operations with their callbacks;
    the caller tells the actors (:meth:`Supervisor.changed_here` or engine/peers.py)."""
    now = clock()
    held = None if lease is None else lease(now)

    def end(connection: Connection) -> tuple[User | None, list[tuple[Operation, list[OutboxItem]]]]:
        user = None
        if delete:
            delete_user(connection, user_id, now=now, actor=actor)
        else:
            user = set_user_status(
                connection, user_id, UserStatus.DEACTIVATED, now=now, actor=actor
            )
        cancelled = cancel_pending_of_user(
            connection, user_id, now=now, actor=actor, lease=held, origin=origin
        )
        return user, cancelled

    return await store.write(end)
