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
    #: Pending operations one user may have at once; beyond, a start is refused (429).
    max_pending_per_user: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 16
    #: Authenticators one user may have, enrolled or being enrolled (deactivated ones not
    #: counted); beyond, an enrolment is refused (409).
    max_authenticators_per_user: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8
    #: Every this many seconds a process expires the pending operations overdue by as much
    #: that no process of its own holds: those of a process that died, on any host.
    sweep_seconds: Annotated[float, msgspec.Meta(ge=0.5, le=3600)] = 5.0


class CallbackSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Deliveries in flight at once, over all relying parties.
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    #: Deliveries in flight at once to one destination (scheme, host and port), so that one
    #: slow receiver cannot take every slot.
    per_destination: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 8
    #: Where a request may send its callbacks besides its access key's own callback URL:
    #: URL prefixes (scheme, host, port and the start of the path), such as
    #: ``https://bank.example/tapsign/``. Empty: only the access key's callback URL.
    allowed_urls: list[str] = []
    #: Allow callbacks to loopback, link-local and private addresses (and to host names that
    #: resolve to one). Off: such destinations are refused, so that a callback URL cannot
    #: make tapsign post into the network it runs in (server-side request forgery).
    allow_private_networks: bool = False
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0
    first_retry_seconds: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    max_retry_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    #: A delivery still failing after this long is given up (kept, marked failed).
    give_up_seconds: Annotated[float, msgspec.Meta(gt=0)] = 86_400.0
    #: How often a process renews its leases on the callbacks it delivers and takes up those
    #: nobody holds (a command's, a dead process's; engine/callbacks.py).
    rescan_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 5.0
    #: How long a lease lasts unrenewed: the callbacks of a process that died are sent by
    #: another this long after its last renewal. Longer than the rescans, with a margin for
    #: a busy database: a live process whose renewal comes too late loses its rows, and a
    #: callback it was sending at that moment may arrive twice.
    lease_seconds: Annotated[float, msgspec.Meta(ge=0.5, le=3600)] = 30.0


class AttestationSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Device-key attestation at enrolment (engine/attestation.py)."""

    #: ``optional``: an enrolment may come without an attestation (the device is recorded
    #: as unattested), one that comes with one must pass. ``required``: an enrolment without
    #: a valid attestation fails with ``attestation-failed`` (PSD2 RTS arts. 7, 24(2)(b)).
    policy: Literal["optional", "required"] = "optional"
    #: PEM file of the roots Android chains must end at; unset: Google's published roots.
    android_roots: str | None = None
    #: The least security level of the attesting hardware.
    android_min_security_level: Literal["trusted-environment", "strongbox"] = "trusted-environment"
    #: Require a locked bootloader and verified boot (the attestation's rootOfTrust).
    android_verified_boot: bool = True
    #: When not empty, the attesting app's package name must be one of these.
    android_packages: list[str] = []
    #: When not empty, one of the app's signing-certificate SHA-256 digests (hex) must be
    #: one of these.
    android_signing_digests: list[Annotated[str, msgspec.Meta(pattern="^[0-9a-fA-F]{64}$")]] = []
    #: Google's attestation status list (JSON of https://android.googleapis.com/attestation/status),
    #: kept fresh by the operator; read again when the file changes.
    android_revocation_list: str | None = None
    #: PEM file of Apple's App Attestation root; unset: the one Apple publishes.
    apple_root: str | None = None
    #: App IDs (``TEAMID.bundle.id``) allowed to enrol with App Attest; empty: none is.
    apple_app_ids: list[str] = []
    #: Which App Attest environment's AAGUID is accepted.
    apple_environment: Literal["production", "development"] = "production"


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    operations: OperationSettings = msgspec.field(default_factory=OperationSettings)
    callbacks: CallbackSettings = msgspec.field(default_factory=CallbackSettings)
    attestation: AttestationSettings = msgspec.field(default_factory=AttestationSettings)
    #: Where the processes serving this database on this host find each other
    #: (engine/peers.py); None: this process alone.
    peers_dir: str | None = None
    #: Seconds between two readings of the HSM's key list (``[hsm] refresh_seconds``).
    key_refresh_seconds: float = 2.0
