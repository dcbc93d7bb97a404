"""Every HTTP/1.1 exchange ends with its connection either reusable or closed.

Hypercorn (h11, trio worker) decides what becomes of the connection inside the ASGI ``send``
of a response's last message: reused when the request and the response are both complete,
closed otherwise. Quart-Trio cancels the request's tasks as soon as Hypercorn, in that same
call, hands it ``http.disconnect``, and the cancellation lands in the middle of that
bookkeeping (hypercorn/protocol/h11.py ``_maybe_recycle``, trio/tcp_server.py ``_close``):

* a response that ends before the request body has arrived (a 404, 405, 413 or 429 refused
  before the body is read) should close the connection, but the close is cancelled: the
  connection stays open, and the next request on it is never answered, nor is the socket
  ever released;
* a reused connection does not get its keep-alive timer back, and idles until the read
  timeout instead of ``keep_alive_seconds``.

So, over HTTP/1: a response waits, briefly, for the rest of a request body that may be of
an acceptable size; one that does not come in time (or is too large to wait for) gets
``Connection: close``; and the last message of every response is sent shielded from
cancellation, so that Hypercorn's bookkeeping, reuse or close, completes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope

#: How long a response waits for the rest of the request body before closing instead.
BODY_WAIT_SECONDS = 2.0
#: The longest the last message of a response may take to be handed over.
LAST_SEND_SECONDS = 30.0

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


def _expected_body(headers: Any) -> int | None:
    """The body's announced length; None when it is chunked (of unknown length)."""
    length = 0
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


class CompleteExchanges:
    """ASGI middleware around Quart's ``asgi_app`` (see the module's docstring)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or scope["http_version"] not in ("1.0", "1.1"):
            # HTTP/2 streams end independently (and forbid a Connection header).
            await self.app(scope, receive, send)
            return
        expected = _expected_body(scope["headers"])
        received = trio.Event()
        if expected == 0:
            received.set()

        async def receive_noting_the_end() -> ASGIReceiveEvent:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                received.set()
            return message

        async def send_completing(message: Any) -> None:
            if message["type"] == "http.response.start" and not received.is_set():
                # Quart reads the body as it comes, whether the application wants it or not.
                if expected is None or expected <= self.max_body_bytes:
                    with trio.move_on_after(BODY_WAIT_SECONDS):
                        await received.wait()
                if not received.is_set():
                    headers = [*message.get("headers", ()), (b"connection", b"close")]
                    message = {**message, "headers": headers}
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Shielded from Quart-Trio's cancellation, bounded against a client that
                # does not read.
                with trio.CancelScope(
                    shield=True, deadline=trio.current_time() + LAST_SEND_SECONDS
                ):
                    await send(message)
                return
            await send(message)

        await self.app(scope, receive_noting_the_end, send_completing)
