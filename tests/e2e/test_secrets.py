"""Secrets stay secret: after every kind of flow, good and bad, against a real server
logging at INFO level, neither its database files, nor its log, nor its configuration, nor
any error response it gave holds the HSM PIN, an access key or its secret, a device's or
tapsign's private key, or a post-operation context (checklist item 18)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization

from tapsign_sdk.client import ApiError, Client, Payee
from tapsign_sdk.device import Device
from tests.e2e.serving import serving

POST_CONTEXT = "card PIN 4711-SECRET-93c1"


def _forms(secret: bytes) -> list[bytes]:
    """The ways a secret could be written down: as is, hex, base64 and base64url."""
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret).rstrip(b"="),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
    ]


def test_checklist_18_no_secret_in_the_database_logs_config_or_errors(tmp_path: Path) -> None:
    responses: list[bytes] = []
    with serving(tmp_path / "server") as server:
        phone = Device(server.url)
        with Client(server.url, server.access_key) as client:
            started = client.enroll(username="secret-keeper")
            phone.enroll(started.enrollment.app_link_uri)
            payments: tuple[dict[str, Any], ...] = (
                {},
                {"amount": "12.00", "currency": "EUR", "payee": Payee(name="Shop", account="X1")},
            )
            for fields in payments:
                approval = client.approve(
                    username="secret-keeper", post_operation_context=POST_CONTEXT, **fields
                )
                result = phone.approve(phone.pending()[0])
                assert result.post_operation_context == POST_CONTEXT
                assert client.wait_for_result(approval.status_token).status == "succeeded"
            declined = client.approve(username="secret-keeper", post_operation_context=POST_CONTEXT)
            phone.decline(phone.pending()[0])
            client.wait_for_result(declined.status_token)
            consent = client.sign("I agree.", username="secret-keeper")
            phone.approve(phone.pending()[0])
            client.wait_for_result(consent.status_token)
            intent = client.intent(username="secret-keeper", operation="approve").token
            client.introspect(intent)
        # Refusals that could echo what they were given.
        near_key = server.access_key[:-1] + ("A" if server.access_key[-1] != "A" else "B")
        for key in (near_key, server.access_key + "x", server.access_key.replace("tsk_", "tsl_")):
            with Client(server.url, key) as wrong, pytest.raises(ApiError) as refused:
                wrong.approve(username="secret-keeper", post_operation_context=POST_CONTEXT)
            assert refused.value.status == 401
            responses.append(msgspec.json.encode(refused.value.problem))
        for body, content_type in (
            (b'{"username": "secret-keeper", "postOperationContext": 7}', "application/json"),
            (
                b'{"username": "nobody", "postOperationContext": "' + POST_CONTEXT.encode() + b'"}',
                "application/json",
            ),
            (b"postOperationContext=" + POST_CONTEXT.encode(), "text/plain"),
        ):
            response = httpx.post(
                f"{server.url}/api/v1/approval",
                content=body,
                headers={
                    "Authorization": f"Bearer {server.access_key}",
                    "Content-Type": content_type,
                },
            )
            assert response.status_code >= 400
            responses.append(response.content)
        phone.close()
    directory = server.directory
    pin = (directory / "var" / "softhsm" / "user.pin").read_text().strip()
    key_id, _, key_secret = server.access_key.removeprefix("tsk_").partition("_")
    device_key = phone.authenticator.private_key
    private_scalar = device_key.private_numbers().private_value.to_bytes(32, "big")
    pem = device_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    secrets = {
        "HSM PIN": [pin.encode()],
        "access key": [server.access_key.encode(), key_secret.encode()],
        "post-operation context": [POST_CONTEXT.encode(), *_forms(POST_CONTEXT.encode())[1:]],
        "device private key": [*_forms(private_scalar), pem],
        "a private key in PEM": [b"PRIVATE KEY-----"],
    }
    places = {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in [
            *(directory / "var").glob("tapsign.db*"),
            directory / "server.log",
            directory / "tapsign.toml",
        ]
    }
    assert any(name.endswith(".db") for name in places)
    assert b"tapsign serving on" in places["server.log"]  # the log was written
    places |= {f"error response {number}": body for number, body in enumerate(responses)}
    assert len(responses) == 6
    found = [
        f"{what} in {place}"
        for what, forms in secrets.items()
        for form in forms
        for place, content in places.items()
        if form in content
    ]
    assert found == []
    # What may be there is there: the key id names the key, the user is known.
    assert key_id.encode() in places["var/tapsign.db"] + places.get("var/tapsign.db-wal", b"")
