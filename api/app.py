"""The Quart-Trio application: routes, error rendering, health, metrics, OpenAPI, JWKS.

Every error leaves as RFC 9457 ``application/problem+json``: tapsign's own errors with
their status and problem type, Quart's (404, 405, 413, …) translated, and anything
unexpected as a generic 500 whose details go to the log, never to the caller.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Sequence
from uuid import uuid4

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from api import authenticators, device, introspection, meta, operations, users
from api.exchange import CompleteExchanges
from api.exposition import PUBLISH_SECONDS
from api.metrics import families
from api.proxies import TrustedProxies
from api.routing import (
    Services,
    problem_response,
    record_refusal,
)
from tapsign_sdk.problems import Forbidden, TapsignError, Unauthorized

log = logging.getLogger(__name__)


class _HttpError(TapsignError):
    """Quart's own errors (no route, wrong method, body too large), as problems."""

    def __init__(self, error: HTTPException) -> None:
        super().__init__(error.description or error.name)
        self.status = error.code or 500  # type: ignore[misc]
        self.title = error.name  # type: ignore[misc]
        self.slug = error.name.lower().replace(" ", "-")

    def problem_type(self) -> str:  # type: ignore[override]
        return f"https://tapsign.dev/problems/{self.slug}"


REQUEST_ID = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
#: Set in the app's config when the engine stopped on an error (api/server.py exits 1).
ENGINE_FAILED = "TAPSIGN_ENGINE_FAILED"


#: The resources of each API (``[server] apis``).
APIS = {
    "relying-party": (operations, introspection, users, authenticators),
    "device": (device,),
}


def create_app(
    services: Services,
    *,
    max_body_bytes: int = 65_536,
    apis: Sequence[str] = tuple(APIS),
    trusted_proxies: Sequence[str] = (),
) -> QuartTrio:
    """The application serving ``apis`` (and always health, metrics, JWKS, OpenAPI)."""
    app = QuartTrio("tapsign", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    # A refusal sent before the request body was read must not wedge the connection.
    app.asgi_app = CompleteExchanges(  # type: ignore[method-assign]
        app.asgi_app, max_body_bytes=max_body_bytes
    )
    if trusted_proxies:
        app.asgi_app = TrustedProxies(  # type: ignore[method-assign]
            app.asgi_app, trusted_proxies
        )
    engine = services.engine
    engine_scope = trio.CancelScope()

    async def run_engine(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The engine, for as long as the server runs. Should it stop on an error, the
        process must not go on answering without it: the error is logged and the server
        shuts down (``tapsign serve`` then exits with status 1, for its supervisor to
        restart it; everything acknowledged is stored, tests/e2e/test_crash.py)."""
        try:
            with engine_scope:
                await engine.run(task_status=task_status)
        except Exception:
            log.critical("the engine stopped on an error; shutting down", exc_info=True)
            app.config[ENGINE_FAILED] = True
            os.kill(os.getpid(), signal.SIGTERM)
            raise

    async def publish_metrics() -> None:
        while True:
            services.board.publish(families(services))
            await trio.sleep(PUBLISH_SECONDS)

    @app.before_serving
    async def start_engine() -> None:
        await app.nursery.start(run_engine)
        app.nursery.start_soon(publish_metrics)

    @app.after_serving
    async def stop_engine() -> None:
        """Requests are served by now: stop the engine at once rather than at the end of
        Quart's grace for background tasks (five seconds)."""
        engine_scope.cancel()
        services.board.withdraw()

    @app.before_request
    async def name_the_request() -> None:
        """Every request has an id: the caller's ``X-Request-Id`` when it is a sensible
        one, else a new one. It goes back in the response and into the log lines and audit
        entries of refusals, so that a complaint can be matched to what tapsign recorded
        (checklist item 15)."""
        g.started = time.perf_counter()
        supplied = request.headers.get(REQUEST_ID, "")
        g.request_id = supplied if _REQUEST_ID.match(supplied) else uuid4().hex

    @app.after_request
    async def return_the_request_id(response: Response) -> Response:
        response.headers[REQUEST_ID] = g.get("request_id", "")
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        services.requests.observe(
            f'method="{request.method}",route="{rule}"',
            time.perf_counter() - g.get("started", time.perf_counter()),
        )
        return response

    @app.errorhandler(TapsignError)
    async def tapsign_error(error: TapsignError) -> Response:
        if isinstance(error, Unauthorized | Forbidden):
            await record_refusal(services, error, f"client:{request.remote_addr}")
        return problem_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        return problem_response(_HttpError(error))

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("unexpected error (request %s)", g.get("request_id"), exc_info=error)
        return problem_response(TapsignError("an unexpected error occurred"))

    for api in apis:
        for resource in APIS[api]:
            resource.register(app, services)
    meta.register(app, services)

    return app
