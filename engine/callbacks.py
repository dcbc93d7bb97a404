"""Signed callbacks to relying parties, from the transactional outbox.

Theory of operation
-------------------
An operation's state change and its callback's outbox row are written in one transaction
(engine/actors.py), so a callback exists exactly when the change it reports does, and it
survives a restart.

Each row is delivered by one process, which holds it on a lease (``leased_by`` names the
process, ``lease_until`` the end): a process writes its own rows leased to itself and
delivers them once they are committed; every ``rescan_seconds`` it renews the leases of the
rows it still holds and claims the rows nobody holds: those a command wrote (``tapsign
users deactivate`` cancelling a user's transactions) and those of a process that stopped
renewing (it died, on this host or another). A dead process's rows are taken up once their
leases have run out (``lease_seconds``, 30 s). A live process whose renewal came too late
and whose rows another process took over learns it at that renewal and stops sending them;
only a delivery it had in flight at that moment can arrive twice. A claim does not always
wait for the rescan: rows a command wrote are announced (engine/peers.py, ``on_outbox``),
and a process that finished a callback others of its operation waited behind (one per
operation goes at a time, whichever host wrote them) claims them at once.

Rows are queued per operation and delivered in order: the next callback of an operation
waits until the one before it is delivered or given up. Different operations proceed
independently, at most ``concurrency`` requests in flight, and at most ``per_destination``
to one destination (scheme, host and port), so a relying party whose endpoint fails or
answers slowly does not hold up anyone else's callbacks: a slow receiver holds its own
slots only, and failed deliveries sleep on their backoff (exponential from
``first_retry_seconds``, capped at ``max_retry_seconds``) and are given up after
``give_up_seconds`` (kept in the outbox, marked failed, logged). Delivery is at least once:
``Tapsign-Delivery`` carries the outbox id as an idempotency key.

Where callbacks may go is the operator's decision, not the caller's: a request's callback
URL must be its access key's own or lie under ``allowed_urls`` (:func:`check_callback_url`),
and loopback, link-local and private addresses are refused unless
``allow_private_networks`` is set, when the URL is given (an address) and again when a
delivery resolves the host name (a name that resolves to one), so that a callback URL cannot
make tapsign post into the network it runs in.

Every request is signed with the callback-signing key in the HSM (ES256, verifiable from
the JWKS; docs/reference/callbacks.md)::

    Tapsign-Signature: t=<unix seconds>,kid=<kid>,es256=<base64url r||s over "<t>." + body>
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
import msgspec
import trio
from sqlalchemy.engine import Connection

from engine import statements as db
from engine.model import Clock, Operation
from engine.settings import CallbackSettings
from engine.statements import Lease, OutboxItem
from engine.store import Store
from hsm.keyring import KeyPurpose, Keyring
from tapsign_sdk.payload import b64url
from tapsign_sdk.problems import InvalidInput, ServiceUnavailable

log = logging.getLogger(__name__)

#: The most undelivered rows one rescan takes up.
CLAIM_LIMIT = 1000


class CallbackStatistics(msgspec.Struct, frozen=True, kw_only=True):
    queued: int
    in_flight: int
    delivered: int
    retried: int
    given_up: int


class CallbackDeliverer:
    """Delivers outbox rows; :meth:`enqueue` is called after the rows' transaction commits."""

    def __init__(
        self,
        store: Store,
        keyring: Keyring,
        settings: CallbackSettings,
        *,
        origin: str,
        clock: Clock,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._settings = settings
        self._clock = clock
        self._client = client
        self._queues: dict[str, deque[OutboxItem]] = {}
        self._queued: set[int] = set()
        #: Queued rows whose lease another process took over (this one stalled): not sent.
        self._lost: set[int] = set()
        self._origin = origin
        #: Set when callbacks nobody holds may be claimed: one that others of its operation
        #: waited for is through, or a command wrote some (:meth:`claim_soon`).
        self._claim_now = trio.Event()
        self._limiter = trio.CapacityLimiter(settings.concurrency)
        #: Slots per destination; as many as the configuration names destinations.
        self._destinations: dict[str, trio.CapacityLimiter] = {}
        self._nursery: trio.Nursery | None = None
        self._delivered = 0
        self._retried = 0
        self._given_up = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Queue what the outbox still holds, then deliver until cancelled."""
        async with contextlib.AsyncExitStack() as stack:
            if self._client is None:
                self._client = await stack.enter_async_context(
                    httpx.AsyncClient(timeout=self._settings.timeout_seconds)
                )
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            for key in self._queues:  # queued before the deliverer ran
                self._nursery.start_soon(self._drain, key)
            await self._claim()
            task_status.started()
            try:
                while True:
                    with trio.move_on_after(self._settings.rescan_seconds):
                        await self._claim_now.wait()
                    self._claim_now = trio.Event()
                    await self._claim()
            finally:
                self._nursery = None

    async def _claim(self) -> None:
        """Renew the leases of the rows held here, and take up those nobody holds."""
        now = self._clock()
        lease = self.lease(now)
        held = sorted(self._queued)

        def claim(connection: Connection) -> tuple[set[int], list[OutboxItem]]:
            return db.claim_undelivered(
                connection, now=now, lease=lease, held=held, limit=CLAIM_LIMIT
            )

        try:
            kept, claimed = await self._store.write(claim)
        except ServiceUnavailable as exc:  # the database is away: the next rescan tries again
            log.warning("cannot claim callbacks: %s", exc)
            return
        taken = {item.id for item in claimed}  # lost, then free again and claimed here
        lost = self._queued.intersection(held).difference(kept, taken)
        if lost:
            log.warning("%d callbacks were taken over by another process: not sent here", len(lost))
        self._lost = (self._lost | lost) - taken
        self.enqueue(claimed)

    def claim_soon(self) -> None:
        """Callbacks nobody holds may wait (a command wrote some, or one that others of its
        operation waited for is through): claim now, not at the next rescan."""
        self._claim_now.set()

    def lease(self, now: datetime) -> Lease:
        """This process's hold, from ``now``, on the rows it writes or claims: no other
        process sends them until it runs out unrenewed."""
        return Lease(
            holder=self._origin, until=now + timedelta(seconds=self._settings.lease_seconds)
        )

    def enqueue(self, items: Sequence[OutboxItem]) -> None:
        for item in items:
            if item.id in self._queued:
                continue
            self._queued.add(item.id)
            key = str(item.operation_id or f"outbox-{item.id}")
            queue = self._queues.get(key)
            if queue is not None:
                queue.append(item)
                continue
            self._queues[key] = deque([item])
            if self._nursery is not None:
                self._nursery.start_soon(self._drain, key)

    def statistics(self) -> CallbackStatistics:
        return CallbackStatistics(
            queued=sum(len(queue) for queue in self._queues.values()),
            in_flight=self._limiter.borrowed_tokens,
            delivered=self._delivered,
            retried=self._retried,
            given_up=self._given_up,
        )

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                await self._deliver(queue[0])
                done = queue.popleft().id
                self._queued.discard(done)
                self._lost.discard(done)
        finally:
            if not queue:
                del self._queues[key]

    async def _deliver(self, item: OutboxItem) -> None:
        next_attempt_at, attempts = item.next_attempt_at, item.attempts
        while True:
            await trio.sleep(max((next_attempt_at - self._clock()).total_seconds(), 0.0))
            if item.id in self._lost:
                return  # another process holds it now and sends it
            try:
                destination = _origin(_split(item.url))
            except InvalidInput:
                destination = item.url  # cannot be sent to: its attempts fail on their own
            slots = self._destinations.get(destination)
            if slots is None:
                slots = self._destinations[destination] = trio.CapacityLimiter(
                    self._settings.per_destination
                )
            # The destination's slot first: deliveries queued behind a slow receiver wait
            # without holding one of the slots every destination shares.
            async with slots, self._limiter:
                error = await self._post(item)
            now = self._clock()
            attempts += 1
            if error is None:
                await self._record(item, now=now, delivered=True, next_attempt_at=None, error=None)
                self._delivered += 1
                return
            if (now - item.created_at).total_seconds() >= self._settings.give_up_seconds:
                log.error(
                    "callback %s (%s) given up after %d attempts: %s",
                    item.id,
                    item.event,
                    attempts,
                    error,
                )
                await self._record(
                    item, now=now, delivered=False, next_attempt_at=None, error=error
                )
                self._given_up += 1
                return
            delay = min(
                self._settings.first_retry_seconds * 2 ** (attempts - 1),
                self._settings.max_retry_seconds,
            )
            next_attempt_at = now + timedelta(seconds=delay)
            log.info("callback %s failed (%s); retry in %.0f s", item.id, error, delay)
            await self._record(
                item, now=now, delivered=False, next_attempt_at=next_attempt_at, error=error
            )
            self._retried += 1

    async def _record(
        self,
        item: OutboxItem,
        *,
        now: datetime,
        delivered: bool,
        next_attempt_at: datetime | None,
        error: str | None,
    ) -> None:
        def record(connection: Connection) -> bool:
            return db.record_delivery(
                connection,
                item.id,
                operation_id=item.operation_id,
                now=now,
                delivered=delivered,
                next_attempt_at=next_attempt_at,
                error=error,
            )

        if await self._store.write(record):
            self.claim_soon()

    async def _post(self, item: OutboxItem) -> str | None:
        """One attempt; None if the relying party took it (2xx), else why not."""
        timestamp = str(int(self._clock().timestamp()))
        signed = timestamp.encode() + b"." + item.body
        kid, signature = await trio.to_thread.run_sync(
            self._keyring.with_active,
            KeyPurpose.CALLBACK,
            lambda key: (key.kid, self._keyring.sign(key.kid, signed)),
        )
        headers = {
            "Content-Type": "application/json",
            "Tapsign-Event": item.event,
            "Tapsign-Delivery": str(item.id),
            "Tapsign-Signature": f"t={timestamp},kid={kid},es256={b64url(signature)}",
        }
        if self._client is None:  # pragma: no cover - run() sets it first
            return "no HTTP client"
        if not self._settings.allow_private_networks:
            refusal = await _private_destination(item.url)
            if refusal is not None:
                log.warning("callback %s refused: %s", item.id, refusal)
                return refusal
        try:
            response = await self._client.post(item.url, content=item.body, headers=headers)
        except httpx.HTTPError as exc:
            return type(exc).__name__
        except Exception as exc:  # e.g. httpx.InvalidURL: this callback fails, not the rest
            log.warning("callback %s cannot be sent to its URL: %r", item.id, exc)
            return type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"


def outbox_row(
    connection: Connection,
    operation: Operation,
    now: datetime,
    *,
    event: str,
    body: dict[str, Any],
    lease: Lease | None,
) -> OutboxItem | None:
    """Write a callback about ``operation`` into the outbox, in the caller's transaction,
    held by the writing process under ``lease`` (None: for whichever claims it). Returns
    it to be queued once committed, or None if it is to be claimed: the writer holds no
    lease on it (None given, or an earlier callback of the operation is another's)."""
    if operation.callback_url is None:  # pragma: no cover - callers check
        raise InvalidInput("no callback URL", field="callbackUrl")
    document = msgspec.json.encode(
        {
            "event": event,
            "transactionId": str(operation.id),
            "timestamp": now.isoformat(timespec="milliseconds"),
            **body,
        }
    )
    outbox_id, held = db.insert_outbox(
        connection,
        operation_id=operation.id,
        event=event,
        url=operation.callback_url,
        body=document,
        now=now,
        lease=lease,
    )
    if held is None:
        return None
    return OutboxItem(
        id=outbox_id,
        operation_id=operation.id,
        event=event,
        url=operation.callback_url,
        body=document,
        attempts=0,
        created_at=now,
        next_attempt_at=now,
    )


def check_callback_url(url: str, *, own: str | None, settings: CallbackSettings) -> str:
    """``url``, if a request may have its callbacks sent there: its access key's own callback
    URL, or a URL under one of ``settings.allowed_urls``, and not a private address unless
    allowed; :class:`InvalidInput` otherwise."""
    split = _split(url)
    if url != own and not any(_under(split, _split(allowed)) for allowed in settings.allowed_urls):
        raise InvalidInput(
            "the callback URL must be the access key's own or one that the [callbacks] "
            "allowed_urls setting allows",
            field="callbackUrl",
        )
    check_destination(url, settings)
    return url


def check_destination(url: str, settings: CallbackSettings) -> None:
    """Refuse a URL whose host is a loopback, link-local or private address (or
    ``localhost``) unless ``allow_private_networks``; names are checked when resolved."""
    host = (_split(url).hostname or "").lower()
    if settings.allow_private_networks:
        return
    if host == "localhost" or host.endswith(".localhost") or _non_public(host):
        raise InvalidInput(
            "callbacks to loopback, link-local and private addresses are not allowed "
            "([callbacks] allow_private_networks)",
            field="callbackUrl",
        )


def _split(url: str) -> SplitResult:
    """``url`` split, with a host and a port that can be read; :class:`InvalidInput` if not."""
    try:
        split = urlsplit(url)
        split.hostname, split.port  # noqa: B018 - each raises ValueError if malformed
    except ValueError as exc:
        raise InvalidInput("the callback URL is an http(s) URL", field="callbackUrl") from exc
    return split


def _origin(url: SplitResult) -> str:
    default = 443 if url.scheme == "https" else 80
    return f"{url.scheme}://{(url.hostname or '').lower()}:{url.port or default}"


def _under(url: SplitResult, allowed: SplitResult) -> bool:
    """Whether ``url`` has the origin of ``allowed`` and a path that starts with its path."""
    return _origin(url) == _origin(allowed) and url.path.startswith(allowed.path)


def _non_public(host: str) -> bool:
    """Whether ``host`` is an IP address that is not a public unicast one."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


async def _private_destination(address: str) -> str | None:
    """Why a delivery to ``address`` is refused (its host is or resolves to a non-public
    address), or None. (The HTTP client resolves the name again; an operator who must close
    that window too puts an egress proxy in front, docs/reference/callbacks.md.)"""
    try:
        url = _split(address)
    except InvalidInput:
        return "InvalidURL"
    host = (url.hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost") or _non_public(host):
        return "destination address not allowed"
    try:
        found = await trio.socket.getaddrinfo(host, url.port or 443, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        return f"cannot resolve the destination: {exc.strerror or type(exc).__name__}"
    if any(_non_public(str(entry[4][0]).split("%")[0]) for entry in found):
        return "destination resolves to a non-public address"
    return None
