"""The client's address behind trusted proxies (api/proxies.py), and the TLS and proxy
settings refused when they do not make sense."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from api.proxies import TrustedProxies, client_address
from api.settings import load_settings
from tapsign_sdk.problems import ConfigurationError

BALANCERS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # Not from a proxy: the headers are the caller's own invention.
        ("198.51.100.4", ["203.0.113.7"], "198.51.100.4"),
        # One balancer: the address it saw.
        ("10.0.0.2", ["203.0.113.7"], "203.0.113.7"),
        # A client that sends its own header first: the balancer appended the real one.
        ("10.0.0.2", ["1.2.3.4, 203.0.113.7"], "203.0.113.7"),
        # Two trusted hops, two headers: the rightmost untrusted.
        ("10.0.0.2", ["1.2.3.4", "203.0.113.7, 10.1.1.1"], "203.0.113.7"),
        ("fd00::1", ["2001:db8::5"], "2001:db8::5"),
        # Only trusted hops: the leftmost of them.
        ("10.0.0.2", ["10.9.9.9, 10.1.1.1"], "10.9.9.9"),
        # No header, or garbage in it: no further than the last good address.
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", ["not-an-address"], "10.0.0.2"),
        ("10.0.0.2", ["203.0.113.7, junk, 10.1.1.1"], "10.1.1.1"),
    ],
)
def test_the_client_is_the_rightmost_untrusted_hop(
    peer: str, forwarded: list[str], client: str
) -> None:
    assert client_address(peer, forwarded, BALANCERS) == client


async def test_the_middleware_puts_the_client_in_the_scope() -> None:
    seen: list[Any] = []

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        seen.append(scope.get("client"))

    async def receive() -> Any:
        raise AssertionError("not called")

    async def send(event: Any) -> None:
        raise AssertionError("not called")

    middleware = TrustedProxies(app, ["10.0.0.0/8"])
    for peer in ("10.0.0.2", "198.51.100.4"):
        scope: Any = {
            "type": "http",
            "client": (peer, 4711),
            "headers": [(b"X-Forwarded-For", b"203.0.113.7")],
        }
        await middleware(scope, receive, send)
    assert seen == [("203.0.113.7", 4711), ("198.51.100.4", 4711)]


@pytest.mark.parametrize(
    ("server", "complaint"),
    [
        ('certfile = "c.pem"', "server.certfile and server.keyfile go together"),
        ('keyfile = "k.pem"', "server.certfile and server.keyfile go together"),
        ('client_ca_file = "ca.pem"', "client_ca_file needs server.certfile"),
        ("apis = []", "names no API"),
        ('apis = ["admin"]', "apis"),
        ('trusted_proxies = ["10.0.0.0/33"]', "'10.0.0.0/33' is not a network"),
    ],
)
def test_settings_that_make_no_sense_are_refused(
    tmp_path: Path, server: str, complaint: str
) -> None:
    config = tmp_path / "tapsign.toml"
    config.write_text(f"[server]\n{server}\n")
    with pytest.raises(ConfigurationError, match=complaint):
        load_settings({"TAPSIGN_CONFIG": str(config)})
