"""Putting tapsign together and serving it with Hypercorn (trio worker)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from api.access import AccessKeys
from api.admission import Admission, LongPolls
from api.app import ENGINE_FAILED, create_app
from api.device_auth import DeviceRequests
from api.exposition import Board
from api.ratelimit import RateLimit
from api.routing import Services
from api.settings import Settings, read_metrics_token
from api.tokens import Tokens
from engine.model import utc_now
from engine.service import Engine
from hsm.errors import KeyNotFound
from hsm.keyring import KeyPurpose, open_keyring
from hsm.settings import read_pin
from hsm.verifier import BatchVerifier
from hsm.verify_backends import make_verify_backend
from tapsign_sdk.problems import ConfigurationError, TapsignError

log = logging.getLogger(__name__)

#: mallopt's parameter number for the most malloc arenas (glibc's malloc.h).
_M_ARENA_MAX = -8


def _limit_malloc_arenas(environ: Mapping[str, str] = os.environ) -> None:
    """Two glibc malloc arenas instead of up to eight per core, unless ``MALLOC_ARENA_MAX``
    already chose.

    glibc gives threads that allocate at once arenas of their own; the database, verifier
    and Trio worker threads each got one, and freed memory scattered over them is not given
    back: the server's resident memory grew by a third over a 10-minute load test without
    levelling off. With two arenas it stays within the bounds of its caches, at the same
    throughput (docs/discussion/performance.md). Other C libraries: nothing to do.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc
    libc.mallopt(_M_ARENA_MAX, 2)


def build_app(settings: Settings, environ: Mapping[str, str] = os.environ) -> QuartTrio:
    """The application with its engine, keyring and verifier, from ``settings``."""
    _limit_malloc_arenas(environ)
    keyring = open_keyring(settings.hsm, pin=read_pin(settings.hsm, environ))
    try:
        for purpose in KeyPurpose:
            keyring.active(purpose)
    except KeyNotFound as exc:
        raise ConfigurationError(str(exc)) from exc
    verifier = BatchVerifier(
        make_verify_backend(settings.verifier, keyring),
        workers=settings.verifier.worker_count(),
        max_queue=settings.verifier.max_queue,
        max_batch=settings.verifier.max_batch,
    )
    base_url = settings.server.base_url()
    limits = settings.ratelimit
    engine = Engine(settings.engine(), keyring=keyring, verifier=verifier, issuer=base_url)
    services = Services(
        engine=engine,
        tokens=Tokens(keyring, engine.store, issuer=base_url, clock=utc_now),
        access_keys=AccessKeys(engine.store, clock=utc_now),
        devices=DeviceRequests(engine, clock=utc_now),
        admission=Admission(settings.server.max_active_requests),
        long_polls=LongPolls(
            per_transaction=settings.server.long_polls_per_transaction,
            per_address=settings.server.long_polls_per_address,
        ),
        metrics_token=read_metrics_token(settings.server, environ),
        address_limit=RateLimit(
            limits.address_per_second, limits.address_burst, what="client address"
        ),
        device_limit=RateLimit(limits.device_per_second, limits.device_burst, what="device"),
        base_url=base_url,
        clock=utc_now,
        board=Board(settings.server.metrics_dir),
    )
    engine.record_listeners += [services.access_keys.forget_all, services.devices.forget_all]
    return create_app(
        services,
        max_body_bytes=settings.server.max_body_bytes,
        apis=settings.server.apis,
        trusted_proxies=settings.server.trusted_proxies,
    )


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.server.host}:{settings.server.port}"]
    config.worker_class = "trio"
    config.workers = settings.server.process_count()
    config.keep_alive_timeout = settings.server.keep_alive_seconds
    config.read_timeout = int(settings.server.read_timeout_seconds)
    # Slow clients get a bounded share: headers and bodies must arrive in time, and a
    # connection may not hold more than this many requests in flight.
    config.h11_max_incomplete_size = 16 * 1024
    config.backlog = 1024
    # Hypercorn logs through the "hypercorn.error" logger, to tapsign's own handlers.
    config.accesslog = None
    config.errorlog = None
    server = settings.server
    if server.certfile is not None:
        config.certfile, config.keyfile = server.certfile, server.keyfile
        if server.client_ca_file is not None:
            config.ca_certs = server.client_ca_file
            config.verify_mode = ssl.CERT_REQUIRED
    return config


async def serve(
    settings: Settings, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve in this process until SIGINT or SIGTERM."""
    app = build_app(settings)
    config = hypercorn_config(settings)

    async def shutdown_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for received in signals:
                log.info("received %s: shutting down", signal.Signals(received).name)
                return

    log.info("tapsign serving on %s", settings.server.base_url())
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_on_signal, task_status=task_status)  # type: ignore[arg-type]
    if app.config.get(ENGINE_FAILED):
        raise SystemExit(1)


def answers(url: str) -> bool:
    """Whether a ready tapsign server answers at ``url``."""
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def local_server(
    what: str, *, environment: Mapping[str, str] | None = None, workers: int | None = None
) -> Iterator[tuple[int, str]]:
    """``tapsign serve`` of this configuration (``environment``: of the process, by default
    this one's) in a process of its own on a free loopback port, for ``what`` (named if it
    does not start): its pid and URL, once it is ready; stopped on the way out."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "api.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(  # noqa: S603 - this very program
        command, env=None if environment is None else dict(environment), stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise TapsignError(f"the {what}'s server did not start (see its output above)")
            time.sleep(0.2)
        yield process.pid, url
    finally:
        process.terminate()
        process.wait(timeout=30)
