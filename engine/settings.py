"""Settings of the engine: database, operation policy, callbacks."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

#: PSD2 RTS art. 4(3)(d) and the issue's rule: authorisations and signatures live at most 5 min.
PSD2_MAX_SECONDS = 300
#: The shortest lifetime a request may ask for.
MIN_SECONDS = 5


class DatabaseSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: SQLAlchemy URL; SQLite (WAL) in var/ by default, ``postgresql+psycopg://…`` in production.
    url: str = "sqlite:///var/tapsign.db"
    #: SQLite only: ``FULL`` fsyncs every commit (survives power loss), ``NORMAL`` survives a
    #: process crash but may lose the last commits on power loss.
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"
    #: Connections kept by the pool, and threads that may wait on the database at once.
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8


class OperationSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Lifetime of an operation when the request gives none.
    default_seconds: Annotated[int, msgspec.Meta(ge=10, le=PSD2_MAX_SECONDS)] = 300
    #: Longest lifetime a registration or authentication may ask for; authorisations and
    #: signatures are capped at PSD2_MAX_SECONDS whatever this says.
    max_seconds: Annotated[int, msgspec.Meta(ge=10, le=86_400)] = 900
    #: Consecutive failed verifications that lock a device (PSD2 RTS art. 4(3)(b): at most 5).
    max_failed_attempts: Annotated[int, msgspec.Meta(ge=1, le=5)] = 5
    #: Answers waiting for one operation's actor beyond this are refused.
    inbox_size: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4


class CallbackSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Deliveries in flight at once, over all relying parties.
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0
    first_retry_seconds: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    max_retry_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    #: A delivery still failing after this long is given up (kept, marked failed).
    give_up_seconds: Annotated[float, msgspec.Meta(gt=0)] = 86_400.0


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    operations: OperationSettings = msgspec.field(default_factory=OperationSettings)
    callbacks: CallbackSettings = msgspec.field(default_factory=CallbackSettings)
    #: Where the processes serving this database on this host find each other
    #: (engine/peers.py); None: this process alone.
    peers_dir: str | None = None
