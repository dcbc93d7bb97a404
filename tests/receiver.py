"""A relying party's callback endpoint for tests: a real HTTP/1.1 server (h11 over Trio)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import h11
import msgspec
import trio

from loadtests.run import free_port


class Received(msgspec.Struct, frozen=True):
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """Records every request; ``status`` decides the answer for a path (default 200), and
    ``delay`` how long the answer takes (default at once)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.received: list[Received] = []
        self.status: Callable[[str], int] = lambda path: 200
        self.delay: Callable[[str], float] = lambda path: 0.0
        self.arrived = trio.Event()

    def url(self, path: str = "/callbacks") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        # The client may go away mid-exchange (e.g. tapsign shut down): nothing to do then.
        with contextlib.suppress(trio.BrokenResourceError, h11.RemoteProtocolError):
            await self._exchange(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        async with stream:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    path = request.target.decode()
                    headers = {
                        name.decode().lower(): value.decode() for name, value in request.headers
                    }
                    self.received.append(Received(path, headers, body))
                    self.arrived.set()
                    self.arrived = trio.Event()
                    await trio.sleep(self.delay(path))
                    response = h11.Response(
                        status_code=self.status(path), headers=[("content-length", "0")]
                    )
                    await stream.send_all(connection.send(response) or b"")
                    await stream.send_all(connection.send(h11.EndOfMessage()) or b"")
                    connection.start_next_cycle()
                else:
                    return


@contextlib.contextmanager
def receiving(receiver: Receiver) -> Iterator[Receiver]:
    """``receiver`` serving in a thread of its own (for tests that are not Trio's)."""
    ready = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    cancel = trio.CancelScope()

    async def receive() -> None:
        token.append(trio.lowlevel.current_trio_token())
        with cancel:
            async with trio.open_nursery() as nursery:
                await nursery.start(receiver.serve)
                ready.set()

    thread = threading.Thread(target=trio.run, args=(receive,), daemon=True)
    thread.start()
    ready.wait(timeout=30)
    try:
        yield receiver
    finally:
        trio.from_thread.run_sync(cancel.cancel, trio_token=token[0])
        thread.join(timeout=30)
