"""The OpenAPI 3.1 document and the human-readable API page, generated from the routes.

Every route is declared through :func:`api.routing.route`, which records its method, path,
authentication, body and response types; the schemas come from the msgspec wire types
(``msgspec.json.schema_components``), so the document cannot drift from the code.
"""

from __future__ import annotations

import functools
import html
from typing import Any

import msgspec

from api.routing import ROUTES, Auth, RouteSpec
from api.wire import Problem

_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    Auth.NONE: [],
    Auth.ACCESS_KEY: [{"accessKey": []}],
    Auth.ACCESS_KEY_OR_INTENT: [{"accessKey": []}, {"intentToken": []}],
    Auth.DEVICE: [{"deviceSignature": []}],
    Auth.DEVICE_OR_DISPATCH: [{"deviceSignature": []}, {"dispatchToken": []}],
}


def _types() -> list[Any]:
    found: list[Any] = [Problem]
    for spec in ROUTES:
        for kind in (spec.request, spec.response):
            if kind is not None and kind is not str and kind not in found:
                found.append(kind)
    return found


@functools.cache
def openapi_document(base_url: str) -> dict[str, Any]:
    types = _types()
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema_of = dict(zip((id(kind) for kind in types), schemas, strict=True))
    problem = {"application/problem+json": {"schema": schema_of[id(Problem)]}}
    paths: dict[str, dict[str, Any]] = {}
    for spec in ROUTES:
        operation: dict[str, Any] = {
            "operationId": spec.method.lower()
            + spec.path.replace("/", "_")
            .replace("{", "")
            .replace("}", "")
            .replace(".", "")
            .replace("-", "_"),
            "summary": spec.summary,
            "description": spec.description,
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
        if spec.path == "/api/v1/users" and spec.method == "GET":
            operation["parameters"] = [
                {"name": "username", "in": "query", "required": True, "schema": {"type": "string"}}
            ]
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


@functools.cache
def api_page(base_url: str) -> str:
    """A plain HTML page of the API, from the OpenAPI document."""
    document = openapi_document(base_url)
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
                f"{html.escape(operation['description'])}</p>"
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
        f"<td>{html.escape(_type_name(field))}</td></tr>"
        for name, field in properties.items()
    )
    return (
        f"<p>{title}:</p><table><tr><th>field</th><th>required</th><th>type</th></tr>{rows}</table>"
    )


def _type_name(field: dict[str, Any]) -> str:
    if "$ref" in field:
        return str(field["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in field:
        return " or ".join(_type_name(option) for option in field["anyOf"])
    return str(field.get("type", "any"))
