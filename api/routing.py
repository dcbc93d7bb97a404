"""How a route is declared: one decorator decodes, authenticates, calls, encodes and records
the route for the OpenAPI document, so that no route can be missing from it.

Errors are raised as :class:`~engine.errors.TapsignError` subclasses and rendered once, as
RFC 9457 ``application/problem+json``, by the handlers in :mod:`api.app`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs
from uuid import UUID

import msgspec
from quart import Quart, Response, g, request
from sqlalchemy.engine import Connection

from api.access import AccessKeys
from api.admission import Admission, LongPolls
from api.device_auth import DeviceRequests
from api.exposition import Board
from api.ratelimit import RateLimit
from api.tokens import Tokens
from engine import statements as db
from engine.histogram import REQUEST_SECONDS, Histograms
from engine.model import Clock, Device
from engine.replay import Nonce
from engine.service import Engine
from engine.statements import AccessKeyRecord
from engine.tokens import TokenKind
from tapsign_sdk.problems import (
    BadRequest,
    Forbidden,
    InvalidInput,
    TapsignError,
    Unauthorized,
    UnsupportedMediaType,
)
from tapsign_sdk.wire import Problem

log = logging.getLogger(__name__)
security = logging.getLogger("tapsign.security")


class Auth(StrEnum):
    NONE = "none"
    ACCESS_KEY = "access-key"
    #: An access key with the scope, or an intent token for this operation.
    ACCESS_KEY_OR_INTENT = "access-key-or-intent"
    DEVICE = "device"
    #: A signed device request, or the dispatch token of a registration.
    DEVICE_OR_DISPATCH = "device-or-dispatch"


@dataclass(frozen=True)
class Services:
    engine: Engine
    tokens: Tokens
    access_keys: AccessKeys
    devices: DeviceRequests
    admission: Admission
    long_polls: LongPolls
    #: The bearer token ``/metrics`` requires; None: it is open.
    metrics_token: str | None
    #: The device API's rate limits (api/ratelimit.py).
    address_limit: RateLimit[str]
    device_limit: RateLimit[UUID]
    base_url: str
    clock: Clock
    #: Where this host's workers publish their metrics (api/exposition.py).
    board: Board = field(default_factory=lambda: Board(None))
    #: Seconds per request, per method and route.
    requests: Histograms = field(default_factory=lambda: Histograms(REQUEST_SECONDS))


@dataclass
class Call:
    """One request, authenticated."""

    services: Services
    client: AccessKeyRecord | None = None
    #: The claims of the intent or dispatch token the request came with.
    grant: dict[str, Any] | None = None
    device: Device | None = None
    #: The signed device request's nonce, for the route to spend in its own unit of work
    #: (routes declared ``spends_nonce``: engine/replay.py).
    nonce: Nonce | None = None

    @property
    def actor(self) -> str:
        if self.client is not None:
            return f"relying-party:{self.client.id}"
        if self.device is not None:
            return f"device:{self.device.id}"
        if self.grant is not None and "cid" in self.grant:
            return f"intent:{self.grant['cid']}"  # an intent token issued by this access key
        return "token"


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    summary: str
    tag: str
    auth: Auth
    scope: str | None
    request: Any
    response: Any
    status: int
    form: bool = False
    intent: str | None = None
    #: Starts a transaction: refused with 503 while the server is saturated (api/admission.py).
    starts: bool = False
    #: The handler spends the device request's nonce itself (``Call.nonce``).
    spends_nonce: bool = False
    description: str = ""
    path_parameters: tuple[str, ...] = field(default=())


#: Where an app keeps its route table (``app.extensions``), read by :func:`routes_of`.
ROUTES_EXTENSION = "tapsign.routes"
_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_AT = re.compile(r"at `\$\.?([^`]*)`|field `([^`]*)`")


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status=status, content_type="application/json")


def decode_body(data: bytes, content_type: str | None, kind: Any) -> Any:
    """``data`` as ``kind``: 415 for a wrong media type, 400 for malformed JSON, 422 for
    JSON that does not fit (wrong type, unknown or missing field, value out of range),
    naming the field."""
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        found = _AT.search(str(exc))
        raise InvalidInput(
            str(exc).split(" - at ")[0], field=(found.group(1) or found.group(2)) if found else None
        ) from exc
    except msgspec.DecodeError as exc:
        # msgspec's own message may begin with its own "JSON is malformed: ".
        raise BadRequest(f"malformed JSON: {str(exc).removeprefix('JSON is malformed: ')}") from exc


async def record_refusal(services: Services, error: Unauthorized | Forbidden, actor: str) -> None:
    """Failures are generic to the caller and specific in the audit trail (RTS art. 4(3)(a))."""
    reason = error.reason if isinstance(error, Unauthorized) else str(error)
    request_id = g.get("request_id", "")
    security.warning(
        "refused %s %s: %s (%s, request %s)",
        request.method,
        request.path,
        reason,
        actor,
        request_id,
    )
    now = services.clock()
    # Read the request here: the unit runs in the database writer's thread, outside it.
    suffix = f" [request {request_id}]"
    detail = f"{request.method} {request.path}: {reason}"[: 300 - len(suffix)] + suffix

    def append(connection: Connection) -> None:
        db.append_audit(
            connection,
            at=now,
            actor=actor,
            action="auth.refused",
            outcome="refused",
            reason=detail,
        )

    await services.engine.store.write(append)


def _bearer() -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("no bearer credentials")
    return token.strip()


async def _authenticate(spec: RouteSpec, call: Call, body: bytes, path: dict[str, Any]) -> None:
    services = call.services
    if spec.auth in (Auth.ACCESS_KEY, Auth.ACCESS_KEY_OR_INTENT):
        token = _bearer()
        if spec.auth is Auth.ACCESS_KEY_OR_INTENT and not token.startswith("tsk_"):
            claims = services.tokens.verify(token, TokenKind.INTENT)
            if claims.get("op") != spec.intent:
                raise Forbidden("this intent token is for another operation")
            call.grant = claims
            return
        call.client = await services.access_keys.verify(token)
        if spec.scope is not None and spec.scope not in call.client.scopes:
            raise Forbidden(f"this access key lacks the {spec.scope} scope")
        return
    if spec.auth is Auth.DEVICE_OR_DISPATCH and "Authorization" in request.headers:
        call.grant = services.tokens.verify(_bearer(), TokenKind.DISPATCH)
        return
    if spec.auth in (Auth.DEVICE, Auth.DEVICE_OR_DISPATCH):
        target = request.full_path if request.query_string else request.path
        call.device, call.nonce = await services.devices.authenticate(
            method=request.method,
            path=target,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=body,
            spend_now=not spec.spends_nonce,
        )


Handler = Callable[..., Awaitable[Any]]


def routes_of(app: Quart) -> list[RouteSpec]:
    """The routes registered on ``app``, in order (its OpenAPI document is made of them)."""
    routes: list[RouteSpec] = app.extensions.setdefault(ROUTES_EXTENSION, [])
    return routes


def route(
    app: Quart,
    services: Services,
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    auth: Auth,
    scope: str | None = None,
    body: Any = None,
    response: Any = None,
    status: int = 200,
    form: bool = False,
    intent: str | None = None,
    starts: bool = False,
    spends_nonce: bool = False,
) -> Callable[[Handler], Handler]:
    """Register ``handler(call, [body,] **path_parameters)`` for ``method path``.

    ``path`` is written OpenAPI-style (``/users/{userId}``); ``{…Id}`` segments are UUIDs.
    """
    parameters = tuple(re.findall(r"{(\w+)}", path))
    quart_path = re.sub(r"{(\w+)}", lambda match: f"<uuid:{_snake(match.group(1))}>", path)

    def register(handler: Handler) -> Handler:
        spec = RouteSpec(
            method=method,
            path=path,
            summary=summary,
            tag=tag,
            auth=auth,
            scope=scope,
            request=body,
            response=response,
            status=status,
            form=form,
            intent=intent,
            starts=starts,
            spends_nonce=spends_nonce,
            description=(handler.__doc__ or "").strip(),
            path_parameters=parameters,
        )
        routes_of(app).append(spec)

        device_api = path.startswith("/device/")

        @functools.wraps(handler)
        async def endpoint(**path_values: Any) -> Response:
            if device_api:
                services.address_limit.take(request.remote_addr or "")
            data = await request.get_data(cache=False)
            if not isinstance(data, bytes):  # pragma: no cover - get_data(as_text=False)
                data = data.encode()
            # Counted once the body is in: a slow upload costs nothing and holds no place.
            with services.admission.serving(starts=starts):
                call = Call(services)
                await _authenticate(spec, call, data, path_values)
                if call.device is not None:
                    services.device_limit.take(call.device.id)
                arguments: list[Any] = []
                if form:
                    arguments.append(_form(data, request.headers.get("Content-Type")))
                elif body is not None:
                    arguments.append(decode_body(data, request.headers.get("Content-Type"), body))
                result = await handler(call, *arguments, **path_values)
            if isinstance(result, Response):
                return result
            if result is None:
                return Response(b"", status=204)
            return json_response(result, status)

        app.add_url_rule(
            quart_path, endpoint=f"{method} {path}", view_func=endpoint, methods=[method]
        )
        return handler

    return register


def _form(data: bytes, content_type: str | None) -> dict[str, str]:
    if (content_type or "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("send the body as application/x-www-form-urlencoded")
    try:
        fields = parse_qs(data.decode("utf-8"), strict_parsing=False, max_num_fields=10)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("malformed form body") from exc
    return {name: values[0] for name, values in fields.items()}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def problem_response(error: TapsignError) -> Response:
    """The RFC 9457 rendering of ``error``."""
    problem = Problem(
        type=error.problem_type(),
        title=error.title,
        status=error.status,
        detail=str(error),
        instance=request.path if request else None,
        field=getattr(error, "field", None),
    )
    response = Response(
        _encoder.encode(problem), status=error.status, content_type="application/problem+json"
    )
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="tapsign"'
    return response
