"""Getting an operation to the phone.

The phone always has the fetch channel: it asks for its pending operations with a signed
request whenever the app opens. A dispatcher adds a nudge. :class:`WebhookDispatcher`, the
first implementation, asks the relying party, which holds the APNs and FCM credentials, to
send the push (a ``push.created`` callback). The notification carries no content: the app
wakes up and fetches the operation, so nothing to be signed travels through the push
service (the Nevis Access App does the same).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from sqlalchemy.engine import Connection

from engine.callbacks import outbox_row
from engine.model import Operation
from engine.statements import Lease, OutboxItem


class Dispatcher(Protocol):
    def dispatch(
        self,
        connection: Connection,
        operation: Operation,
        *,
        notification: str,
        now: datetime,
        lease: Lease,
    ) -> list[OutboxItem]:
        """Arrange the notification in the operation's creating transaction; the outbox rows
        returned are delivered once it commits."""
        ...


class WebhookDispatcher:
    def dispatch(
        self,
        connection: Connection,
        operation: Operation,
        *,
        notification: str,
        now: datetime,
        lease: Lease,
    ) -> list[OutboxItem]:
        pushed = outbox_row(
            connection,
            operation,
            now,
            event="push.created",
            body={
                "userId": str(operation.user_id),
                "authenticatorId": str(operation.device_id),
                "kind": operation.kind.value,
                "notificationMessage": notification,
            },
            lease=lease,
        )
        return [] if pushed is None else [pushed]
