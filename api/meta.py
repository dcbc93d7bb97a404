"""What is not the product's API: the JWKS, liveness and readiness, metrics, and the API's
own description (OpenAPI document and a page for humans). Registered last: the document
describes every route registered before it, and itself."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
from typing import Any

import msgspec
import sqlalchemy as sa
import trio
from quart import Quart, Response, request

from api.exposition import exposition
from api.metrics import families
from api.openapi import api_page, openapi_document
from api.routing import Auth, Call, Services, route, routes_of
from hsm.keyring import KeyPurpose
from tapsign_sdk.problems import ServiceUnavailable, TapsignError, Unauthorized

log = logging.getLogger(__name__)


class Health(msgspec.Struct, frozen=True):
    status: str
    database: str
    hsm: str


def register(app: Quart, services: Services) -> None:
    engine = services.engine

    @route(
        app,
        services,
        "GET",
        "/.well-known/jwks.json",
        summary="Public keys of tapsign's signatures (JWK Set)",
        tag="keys",
        auth=Auth.NONE,
        response=dict[str, list[dict[str, Any]]],
    )
    async def jwks(call: Call) -> Response:
        """Verify consent JWTs, status and result tokens and callback signatures with these
        keys, chosen by ``kid``. Rotated keys stay here until retired."""
        response = Response(
            msgspec.json.encode(engine.keyring.jwks()),
            content_type="application/jwk-set+json",
        )
        response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @route(
        app,
        services,
        "GET",
        "/healthz",
        summary="Liveness",
        tag="operations-monitoring",
        auth=Auth.NONE,
        response=dict[str, str],
    )
    async def healthz(call: Call) -> dict[str, str]:
        """The process serves requests."""
        return {"status": "ok"}

    @route(
        app,
        services,
        "GET",
        "/readyz",
        summary="Readiness: database and HSM reachable",
        tag="operations-monitoring",
        auth=Auth.NONE,
        response=Health,
    )
    async def readyz(call: Call) -> Health:
        """200 when the database answers and the HSM signs; 503 naming which does not (what
        went wrong is logged, not told)."""
        problems = []
        try:
            await engine.store.read(lambda connection: connection.execute(sa.text("select 1")))
        except TapsignError as exc:
            log.warning("not ready: the database: %s", exc)
            problems.append("database")
        try:
            await trio.to_thread.run_sync(
                engine.keyring.with_active,
                KeyPurpose.TOKEN,
                lambda key: engine.keyring.sign(key.kid, b"readiness"),
            )
        except TapsignError as exc:
            log.warning("not ready: the HSM: %s", exc)
            problems.append("hsm")
        if problems:
            raise ServiceUnavailable(f"not ready: {', '.join(problems)}", retry_after=5.0)
        return Health(status="ready", database="ok", hsm="ok")

    @route(
        app,
        services,
        "GET",
        "/metrics",
        summary="Prometheus metrics",
        tag="operations-monitoring",
        auth=Auth.NONE,
        response=str,
    )
    async def metrics(call: Call) -> Response:
        """Requests, verifier, operations, callbacks and database pool, in the text exposition
        format. With a metrics token configured (``[server] metrics_token_file`` or
        ``TAPSIGN_METRICS_TOKEN``), only for ``Authorization: Bearer <that token>``."""
        if services.metrics_token is not None and not hmac.compare_digest(
            hashlib.sha256(request.headers.get("Authorization", "").encode()).digest(),
            hashlib.sha256(f"Bearer {services.metrics_token}".encode()).digest(),
        ):
            raise Unauthorized("no or a wrong metrics token")
        return Response(
            exposition({os.getpid(): families(services), **services.board.others()}),
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @route(
        app,
        services,
        "GET",
        "/openapi.json",
        summary="This API, as OpenAPI 3.1",
        tag="operations-monitoring",
        auth=Auth.NONE,
        response=dict[str, Any],
    )
    async def openapi(call: Call) -> Response:
        """Generated from the routes and their wire types."""
        return Response(openapi_json(), content_type="application/json")

    @route(
        app,
        services,
        "GET",
        "/docs",
        summary="This API, for humans",
        tag="operations-monitoring",
        auth=Auth.NONE,
        response=str,
    )
    async def docs(call: Call) -> Response:
        """Every route with its description, parameters and body fields."""
        return Response(api_html(), content_type="text/html; charset=utf-8")

    # Made once, on first use: the routes are all registered by then.
    document = functools.cache(lambda: openapi_document(routes_of(app), services.base_url))
    openapi_json = functools.cache(lambda: msgspec.json.encode(document()))
    api_html = functools.cache(lambda: api_page(document()))
