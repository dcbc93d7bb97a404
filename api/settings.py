"""tapsign's configuration: defaults, then a TOML file, then ``TAPSIGN_*`` variables.

The file is ``$TAPSIGN_CONFIG`` or ``./tapsign.toml`` when present; a variable
``TAPSIGN_<SECTION>_<KEY>`` overrides ``key`` of ``[section]`` (``TAPSIGN_HSM_MODULE``
sets ``[hsm] module``). Secrets are never settings: the HSM PIN comes from
``TAPSIGN_HSM_PIN`` or the file named by ``hsm.pin_file`` (see :func:`hsm.settings.read_pin`),
and a config file that tries to carry one is refused. docs/reference/configuration.md
lists every key.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from engine.settings import (
    AttestationSettings,
    CallbackSettings,
    DatabaseSettings,
    EngineSettings,
    OperationSettings,
)
from hsm.settings import HsmSettings, VerifierSettings
from tapsign_sdk.problems import ConfigurationError

ENVIRONMENT_PREFIX = "TAPSIGN_"
DEFAULT_CONFIG_FILE = "tapsign.toml"


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HTTP server (Hypercorn, trio worker)."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    #: Hypercorn worker processes, each with its own engine on the shared database; 0: one
    #: per core (docs/discussion/performance.md, "Two processes").
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    #: The URL phones and front ends reach tapsign at (app links, ``iss`` of tokens);
    #: default ``http://<host>:<port>``.
    public_url: str | None = None
    #: Request bodies above this many bytes get 413.
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 * 2**20)] = 65_536
    #: Seconds a keep-alive connection may idle between requests.
    keep_alive_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    #: Seconds without a byte from the client before the connection is dropped. Hypercorn
    #: applies it while a response is pending too, so it must exceed the 30 s long-poll.
    read_timeout_seconds: Annotated[float, msgspec.Meta(ge=35, le=300)] = 45.0
    #: Requests served at once (per process, long-polls not counted) beyond which new
    #: transactions are refused with 503 and Retry-After (api/admission.py).
    max_active_requests: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 64
    #: Where the worker processes on this host tell each other of changed transactions
    #: (engine/peers.py).
    peers_dir: str = "var/peers"
    #: Where the worker processes on this host publish their metrics, so that one scrape
    #: of ``/metrics`` describes them all (api/exposition.py).
    metrics_dir: str = "var/metrics"
    #: Status long-polls held at once (per process) for one transaction, and from one client
    #: address; beyond either, a long-poll is answered at once with the current status.
    long_polls_per_transaction: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4
    long_polls_per_address: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 256
    #: A file holding the bearer token ``/metrics`` requires (``TAPSIGN_METRICS_TOKEN`` in
    #: the environment takes precedence); neither: ``/metrics`` is open to whoever reaches
    #: the port (bind to a private address then).
    metrics_token_file: str | None = None
    #: TLS from Hypercorn: the certificate chain and its private key (PEM). With both,
    #: this instance serves HTTPS only.
    certfile: str | None = None
    keyfile: str | None = None
    #: CA certificates (PEM): every TLS connection must then present a client certificate
    #: one of them signed (mutual TLS), or the handshake fails. Usually on an instance that
    #: serves the relying-party API alone (``apis``): phones have no client certificates.
    client_ca_file: str | None = None
    #: The APIs this instance serves; health, metrics, the JWKS and the OpenAPI document
    #: always (docs/how-to/deploy.md).
    apis: list[Literal["relying-party", "device"]] = msgspec.field(
        default_factory=lambda: ["relying-party", "device"]
    )
    #: Networks (CIDR) of load balancers and proxies in front of tapsign: a request whose
    #: peer is one of them is from the rightmost ``X-Forwarded-For`` address that is not,
    #: for rate limits, long-poll caps and the audit log (api/proxies.py).
    trusted_proxies: list[str] = []

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("server.certfile and server.keyfile go together")
        if self.client_ca_file is not None and self.certfile is None:
            raise ValueError("server.client_ca_file needs server.certfile and server.keyfile")
        if not self.apis:
            raise ValueError("server.apis names no API to serve")
        for network in self.trusted_proxies:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"server.trusted_proxies: {network!r} is not a network") from None

    def process_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def base_url(self) -> str:
        scheme = "http" if self.certfile is None else "https"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")


class RateLimitSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token buckets on the device API (api/ratelimit.py), per process; 0 switches one off."""

    #: Requests a second from one client address (before the request is authenticated).
    address_per_second: Annotated[float, msgspec.Meta(ge=0)] = 100.0
    address_burst: Annotated[int, msgspec.Meta(ge=1)] = 400
    #: Requests a second from one authenticated device.
    device_per_second: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    device_burst: Annotated[int, msgspec.Meta(ge=1)] = 30


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    ratelimit: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)
    hsm: HsmSettings = msgspec.field(default_factory=HsmSettings)
    verifier: VerifierSettings = msgspec.field(default_factory=VerifierSettings)
    database: DatabaseSettings = msgspec.field(default_factory=DatabaseSettings)
    operations: OperationSettings = msgspec.field(default_factory=OperationSettings)
    callbacks: CallbackSettings = msgspec.field(default_factory=CallbackSettings)
    attestation: AttestationSettings = msgspec.field(default_factory=AttestationSettings)

    def engine(self) -> EngineSettings:
        return EngineSettings(
            database=self.database,
            operations=self.operations,
            callbacks=self.callbacks,
            attestation=self.attestation,
            peers_dir=self.server.peers_dir,
            key_refresh_seconds=self.hsm.refresh_seconds,
        )


def _sections() -> dict[str, frozenset[str]]:
    """``{section: its keys}``, read from the types so that the two never disagree."""
    return {
        section.name: frozenset(field.name for field in msgspec.structs.fields(section.type))
        for section in msgspec.structs.fields(Settings)
    }


def load_settings(
    environ: Mapping[str, str] = os.environ, config_file: str | None = None
) -> Settings:
    """The effective settings; :class:`ConfigurationError` naming the offending key."""
    path = config_file or environ.get("TAPSIGN_CONFIG")
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path} is not valid TOML: {exc}") from exc
    sections = _sections()
    for name, value in environ.items():
        if not name.startswith(ENVIRONMENT_PREFIX):
            continue
        section, _, key = name[len(ENVIRONMENT_PREFIX) :].lower().partition("_")
        if key in sections.get(section, ()):
            data.setdefault(section, {})[key] = value
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"invalid configuration: {exc}") from exc


def read_metrics_token(settings: ServerSettings, environ: Mapping[str, str]) -> str | None:
    """The token ``/metrics`` requires, from the environment or its file; None if neither."""
    token = environ.get("TAPSIGN_METRICS_TOKEN")
    if token:
        return token
    if settings.metrics_token_file is None:
        return None
    try:
        token = Path(settings.metrics_token_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read server.metrics_token_file: {exc.strerror}") from exc
    if not token:
        raise ConfigurationError("server.metrics_token_file is empty")
    return token
