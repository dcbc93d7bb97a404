"""``python -m loadtests.costs``: what one request of each kind costs the server in CPU.

One client runs complete payment transactions one after the other (start, signed fetch,
signed answer, status) against a one-process server it starts (like ``make loadtest``),
and reads the server's CPU time around every call. In the same run it measures two
ceilings: a bare Hypercorn ASGI app (trio worker) answering ``GET /healthz``, and
tapsign's own ``GET /healthz`` (the whole stack, no work). Sequential calls cost more
per request than calls under load (nothing is grouped or batched, every call wakes an
idle event loop), so compare the rows with each other and with the ceiling, not with
``make loadtest``. See docs/discussion/performance.md.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loadtests.run import free_port, sample, start_server
from tapsign_sdk.client import Client
from tapsign_sdk.device import Device
from tapsign_sdk.wire import Payee

SHOP = Payee(name="Shop", account="DE89 3704 0044 0532 0130 00")


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The least an ASGI app can do: answer every request with a small JSON body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


def _serve_bare(port: int) -> None:
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    trio.run(serve, bare_app, config)  # type: ignore[arg-type]


def _per_call(pid: int, call: Callable[[], object], count: int) -> float:
    """Server CPU milliseconds per ``call``, over ``count`` calls after a warm-up."""
    for _ in range(20):
        call()
    before = sample(pid)[0]
    for _ in range(count):
        call()
    return (sample(pid)[0] - before) / count * 1000


def _ceiling(count: int) -> float:
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 - this module, in another process
        [sys.executable, "-m", "loadtests.costs", "--serve-bare", str(port)]
    )
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("the bare ASGI app did not start") from None
                time.sleep(0.1)
        with httpx.Client() as http:
            return _per_call(process.pid, lambda: http.get(url), count)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def measure(count: int) -> dict[str, float]:
    """Server CPU ms per call of each kind, and per complete transaction."""
    # At least 200 bare calls: CPU time comes in clock ticks (10 ms), and a ceiling that
    # rounds to nothing would be no ceiling.
    costs = {"bare Hypercorn ASGI app, GET /healthz": _ceiling(max(count, 200))}
    with tempfile.TemporaryDirectory(prefix="tapsign-costs-") as scratch:
        server, url, access_key = start_server(Path(scratch) / "server", 1)
        try:
            with Client(url, access_key) as client, httpx.Client(base_url=url) as http:
                costs["tapsign GET /healthz"] = _per_call(
                    server.pid, lambda: http.get("/healthz"), count
                )
                costs.update(_transaction_steps(server.pid, client, Device(url), count))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    return costs


def _transaction_steps(pid: int, client: Client, phone: Device, count: int) -> dict[str, float]:
    started = client.enroll(username="costs")
    phone.enroll(started.enrollment.app_link_uri)
    steps = {
        "POST /api/v1/approval (payment)": 0.0,
        "GET /device/v1/operations/{id} (fetch)": 0.0,
        "POST /device/v1/operations/{id}/answer": 0.0,
        "POST /api/v1/status (final)": 0.0,
    }
    names = list(steps)
    for _ in range(count):
        marks = [sample(pid)[0]]
        approval = client.approve(
            username="costs", amount="12.50", currency="EUR", payee=SHOP, message="Payment"
        )
        marks.append(sample(pid)[0])
        operation = phone.fetch(approval.transaction_id)
        marks.append(sample(pid)[0])
        phone.approve(operation)
        marks.append(sample(pid)[0])
        status = client.status(approval.status_token, wait=5)
        marks.append(sample(pid)[0])
        if status.status != "succeeded":
            raise SystemExit(f"a transaction ended {status.status}: {status.reason}")
        for index, name in enumerate(names):
            steps[name] += marks[index + 1] - marks[index]
    phone.close()
    per_step = {name: total / count * 1000 for name, total in steps.items()}
    per_step["complete transaction (the four calls)"] = sum(per_step.values())
    return per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--transactions", type=int, default=300, help="calls of each kind")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve_bare:
        _serve_bare(options.serve_bare)
        return 0
    costs = measure(options.transactions)
    ceiling = costs["bare Hypercorn ASGI app, GET /healthz"]
    print(f"server CPU per call, sequential, one client, {options.transactions} of each:")
    for name, cost in costs.items():
        print(f"  {name:<45} {cost:7.2f} ms  {cost / ceiling:5.1f}x the bare app")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
