"""A real tapsign server for the end-to-end tests: ``tapsign serve`` (Hypercorn, trio) on a
loopback port, in a fresh directory with its own SoftHSM2 token and SQLite database, set
up by the same script ``make`` uses. Tests talk to it with the ``sdk/`` clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hsm.settings import default_module
from sdk.client import Client
from sdk.device import Device
from tests.receiver import free_port

ROOT = Path(__file__).resolve().parents[2]
TAPSIGN = Path(sys.executable).with_name("tapsign")


@dataclass(frozen=True)
class Server:
    url: str
    access_key: str
    directory: Path

    def tapsign(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own executable
            [str(TAPSIGN), *arguments],
            cwd=self.directory,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )


def _environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TAPSIGN_", "SOFTHSM2_"))
    }


@contextmanager
def _serving(directory: Path, *, workers: int, config: str = "") -> Iterator[Server]:
    """``tapsign serve`` in ``directory``, with its own token, database and access key, and
    ``config`` as its tapsign.toml."""
    if not Path(default_module()).is_file():
        pytest.skip("SoftHSM2 is not installed: run 'make test' to install it")
    environment = _environment()
    (directory / "tapsign.toml").write_text(config)
    subprocess.run(  # noqa: S603
        [str(ROOT / "softhsm-config" / "init-token.sh"), "var", str(TAPSIGN)],
        cwd=directory,
        env=environment,
        check=True,
        capture_output=True,
        timeout=120,
    )
    created = subprocess.run(  # noqa: S603
        [str(TAPSIGN), "keys", "create", "--name", "e2e", "--json"],
        cwd=directory,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    access_key = json.loads(created.stdout)["accessKey"]
    port = free_port()
    log = (directory / "server.log").open("w")
    process = subprocess.Popen(  # noqa: S603
        [str(TAPSIGN), "serve", "--port", str(port), "--workers", str(workers)],
        cwd=directory,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((directory / "server.log").read_text())
            time.sleep(0.1)
        yield Server(url=url, access_key=access_key, directory=directory)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serving(tmp_path_factory.mktemp("server"), workers=1) as running:
        yield running


@pytest.fixture(scope="session")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of two worker processes on one database (``tapsign serve --workers 2``)."""
    with _serving(tmp_path_factory.mktemp("workers"), workers=2) as running:
        yield running


@pytest.fixture(scope="session")
def saturable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server saturated by one request (``max_active_requests = 1``)."""
    config = "[server]\nmax_active_requests = 1\n"
    with _serving(tmp_path_factory.mktemp("saturable"), workers=1, config=config) as running:
        yield running


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, server.access_key) as client:
        yield client


@pytest.fixture
def phones(server: Server) -> Iterator[Callable[[], Device]]:
    """Make phones; all are closed after the test."""
    made: list[Device] = []

    def make() -> Device:
        made.append(Device(server.url))
        return made[-1]

    yield make
    for device in made:
        device.close()


@pytest.fixture
def phone(phones: Callable[[], Device]) -> Device:
    return phones()
