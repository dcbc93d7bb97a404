"""The client's address behind load balancers and proxies (``[server] trusted_proxies``).

A request whose TCP peer is a trusted proxy is taken to come from the rightmost address in
its ``X-Forwarded-For`` headers that is not itself a trusted proxy: each proxy appends the
address it saw, so everything left of the last untrusted hop may be the client's own
invention. That address replaces the peer in the ASGI scope, and so becomes the one rate
limits, long-poll caps and the audit log use. A request from any other peer keeps its peer
address, whatever headers it sends.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from api.exchange import ASGIApp

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(peer: str, forwarded: Iterable[str], trusted: Sequence[Network]) -> str:
    """The client's address: ``peer``'s, or, if ``peer`` is trusted, the rightmost address of
    the ``X-Forwarded-For`` values ``forwarded`` that is not (the leftmost if all are; the
    last good one if a value is not an address)."""
    if not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded for hop in value.split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return client  # garbage from further left: trust nothing beyond it
        client = hop
        if not _trusted(hop, trusted):
            return client
    return client


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed in network for network in trusted)


class TrustedProxies:
    """ASGI middleware that puts :func:`client_address` in the scope."""

    def __init__(self, app: ASGIApp, networks: Sequence[str]) -> None:
        self.app = app
        self.trusted = [ipaddress.ip_network(network, strict=False) for network in networks]

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http" and scope["client"] is not None:
            peer, port = scope["client"]
            forwarded = [
                value.decode("latin-1")
                for name, value in scope["headers"]
                if name.lower() == b"x-forwarded-for"
            ]
            address = client_address(peer, forwarded, self.trusted)
            if address != peer:
                scope = cast(HTTPScope, {**scope, "client": (address, port)})
        await self.app(scope, receive, send)
