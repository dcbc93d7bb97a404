"""Servers for the end-to-end tests (tests/e2e/serving.py), each in a fresh directory; tests
talk to them with the ``sdk/`` clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tapsign_sdk.client import Client
from tapsign_sdk.device import Device
from tests.e2e.serving import Server, serving


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("server"), workers=1) as running:
        yield running


@pytest.fixture(scope="session")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of two worker processes on one database (``tapsign serve --workers 2``)."""
    with serving(tmp_path_factory.mktemp("workers"), workers=2) as running:
        yield running


@pytest.fixture(scope="session")
def saturable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server saturated by one request (``max_active_requests = 1``)."""
    config = "[server]\nmax_active_requests = 1\n"
    with serving(tmp_path_factory.mktemp("saturable"), workers=1, config=config) as running:
        yield running


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with tight rate limits on the device API (about one request a minute once
    the burst is spent)."""
    config = (
        "[ratelimit]\naddress_per_second = 0.02\naddress_burst = 40\n"
        "device_per_second = 0.02\ndevice_burst = 3\n"
    )
    with serving(tmp_path_factory.mktemp("limited"), workers=1, config=config) as running:
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
