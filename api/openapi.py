"""The OpenAPI 3.1 document and the human-readable API page, generated from the routes.

Every route is declared through :func:`api.routing.route`, which records its method, path,
authentication, body and response types; the schemas come from the msgspec wire types
(``msgspec.json.schema_components``), so the document cannot drift from the code.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import msgspec

from api.routing import Auth, RouteSpec
from tapsign_sdk.wire import Problem

_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    Auth.NONE: [],
    Auth.ACCESS_KEY: [{"accessKey": []}],
    Auth.ACCESS_KEY_OR_INTENT: [{"accessKey": []}, {"intentToken": []}],
    Auth.DEVICE: [{"deviceSignature": []}],
    Auth.DEVICE_OR_DISPATCH: [{"deviceSignature": []}, {"dispatchToken": []}],
}


def _types(routes: Sequence[RouteSpec]) -> list[Any]:
    found: list[Any] = [Problem]
    for spec in routes:
        for kind in (spec.request, spec.response):
            if kind is not None and kind is not str and kind not in found:
                found.append(kind)
    return found


def openapi_document(routes: Sequence[RouteSpec], base_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (an app's: api/routing.py's routes_of)."""
    types = _types(routes)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    components = _with_markdown(components)
    schema_of = dict(zip((id(kind) for kind in types), schemas, strict=True))
    problem = {"application/problem+json": {"schema": schema_of[id(Problem)]}}
    paths: dict[str, dict[str, Any]] = {}
    for spec in routes:
        operation: dict[str, Any] = {
            "operationId": spec.method.lower()
            + spec.path.replace("/", "_")
            .replace("{", "")
            .replace("}", "")
            .replace(".", "")
            .replace("-", "_"),
            "summary": spec.summary,
            "description": _markdown(spec.description),
            "tags": [spec.tag],
            "security": _SECURITY[spec.auth],
            "responses": {
                str(spec.status): _response(spec, schema_of),
                "4XX": {"description": "A problem (RFC 9457)", "content": problem},
                "5XX": {"description": "A problem (RFC 9457)", "content": problem},
            },
        }
        if spec.path_parameters:
            operation["parameters"] = [
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "format": "uuid"},
                }
                for name in spec.path_parameters
            ]
        if (spec.method, spec.path) in _QUERIES:
            operation["parameters"] = _QUERIES[spec.method, spec.path]
        if spec.form:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {"token": {"type": "string"}},
                            "required": ["token"],
                        }
                    }
                },
            }
        elif spec.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of[id(spec.request)]}},
            }
        paths.setdefault(spec.path, {})[spec.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tapsign",
            "version": "1",
            "description": "Self-hosted strong customer authentication: relying-party API "
            "(/api/v1) and device API (/device/v1). Errors are application/problem+json.",
        },
        "servers": [{"url": base_url}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "accessKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "tsk_… access key",
                },
                "intentToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "one-time intent token",
                },
                "dispatchToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "dispatch token of the transaction",
                },
                "deviceSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Tapsign-Signature",
                    "description": "Request signed with the device key, with "
                    "Tapsign-Authenticator, Tapsign-Timestamp and Tapsign-Nonce "
                    "(docs/reference/device-protocol.md)",
                },
            },
        },
    }


def _response(spec: RouteSpec, schema_of: dict[int, Any]) -> dict[str, Any]:
    if spec.status == 204 or spec.response is None:
        return {"description": "Done, no content"}
    if spec.response is str:
        return {"description": "Text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return {
        "description": spec.summary,
        "content": {"application/json": {"schema": schema_of[id(spec.response)]}},
    }


def api_page(document: dict[str, Any]) -> str:
    """A plain HTML page of the API, from its OpenAPI ``document``."""
    components = document["components"]["schemas"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tapsign API</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em}"
        "code,pre{background:#f4f4f4}h3{margin-bottom:0}table{border-collapse:collapse}"
        "td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}</style></head><body>",
        "<h1>tapsign API</h1><p>OpenAPI 3.1: <a href='/openapi.json'>/openapi.json</a>. "
        "Errors are <code>application/problem+json</code> (RFC 9457).</p>",
    ]
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            parts.append(
                f"<h3><code>{method.upper()} {html.escape(path)}</code></h3>"
                f"<p><b>{html.escape(operation['summary'])}</b>. "
                f"{_code_spans(html.escape(operation['description']))}</p>"
            )
            schemes = [next(iter(option)) for option in operation["security"]]
            parts.append(f"<p>Authentication: {', '.join(schemes) or 'none'}</p>")
            body = operation.get("requestBody", {}).get("content", {})
            for content in body.values():
                parts.append(_fields_table("Request body", content["schema"], components))
    parts.append("</body></html>")
    return "".join(parts)


def _fields_table(title: str, schema: dict[str, Any], components: dict[str, Any]) -> str:
    reference = schema.get("$ref", "")
    resolved = components.get(reference.rsplit("/", 1)[-1], schema)
    properties = resolved.get("properties", {})
    if not properties:
        return ""
    required = set(resolved.get("required", []))
    rows = "".join(
        f"<tr><td><code>{html.escape(name)}</code></td>"
        f"<td>{'yes' if name in required else ''}</td>"
        f"<td>{html.escape(_type_name(field, components))}</td></tr>"
        for name, field in properties.items()
    )
    return (
        f"<p>{title}:</p><table><tr><th>field</th><th>required</th><th>type</th></tr>{rows}</table>"
    )


def _type_name(field: dict[str, Any], components: dict[str, Any]) -> str:
    """A field's type for a reader: an enumeration as its values, a record by its name."""
    if "$ref" in field:
        name = str(field["$ref"]).rsplit("/", 1)[-1]
        target = components.get(name, {})
        return _type_name(target, components) if "enum" in target else name
    if "enum" in field:
        return " or ".join(msgspec.json.encode(value).decode() for value in field["enum"])
    if "anyOf" in field:
        return " or ".join(_type_name(option, components) for option in field["anyOf"])
    return str(field.get("type", "any"))


#: The query parameters of the routes that have some.
_QUERIES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("GET", "/api/v1/users"): [
        {"name": "username", "in": "query", "required": True, "schema": {"type": "string"}}
    ],
    ("GET", "/device/v1/operations"): [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
        },
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "The `next` of the previous page",
            "schema": {"type": "string"},
        },
    ],
}


def _with_markdown(schema: Any) -> Any:
    """``schema`` with every description (the wire types' docstrings) in CommonMark."""
    if isinstance(schema, dict):
        return {
            key: _markdown(value)
            if key == "description" and isinstance(value, str)
            else _with_markdown(value)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_with_markdown(item) for item in schema]
    return schema


def _markdown(docstring: str) -> str:
    """A route's docstring (reStructuredText literals) as the CommonMark OpenAPI reads."""
    return re.sub(r"``(.+?)``", r"`\1`", docstring, flags=re.DOTALL)


def _code_spans(text: str) -> str:
    """CommonMark code spans as HTML, in text already escaped."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
