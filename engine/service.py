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
from uuid import UUID

import httpx
import trio

from engine import audit
from engine import store as db
from engine.actors import Context, Supervisor
from engine.attestation import Attestor
from engine.callbacks import CallbackDeliverer
from engine.dispatch import WebhookDispatcher
from engine.identity import Identity
from engine.model import Clock, User, utc_now
from engine.peers import Peers
from engine.settings import EngineSettings
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
        self.identity = Identity(self.store, clock=clock)
        self.callbacks = CallbackDeliverer(
            self.store, keyring, settings.callbacks, clock=clock, client=http_client
        )
        self.peers = Peers(settings.peers_dir)
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
                await nursery.start(self.peers.run, self.supervisor.changed_elsewhere)
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
        user = await self.identity.deactivate_user(user_id, actor=actor)
        await self.supervisor.cancel_pending_for_user(user_id)
        return user

    async def delete_user(self, user_id: UUID, *, actor: str) -> None:
        """Cancel what the user had pending, then delete the user and the user's devices."""
        await self.supervisor.cancel_pending_for_user(user_id)
        await self.identity.delete_user(user_id, actor=actor)

    async def verify_audit(self) -> list[str]:
        """Problems found in the audit trail; empty when it is intact."""
        entries, head_seq, head_hash = await self.store.read(db.read_audit)
        return audit.verify_chain(entries, head_seq=head_seq, head_hash=head_hash)
