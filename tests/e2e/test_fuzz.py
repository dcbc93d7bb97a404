"""Schema-driven fuzzing of every route in ``/openapi.json`` (schemathesis) against a real
server: whatever the request, no 5xx, and every refusal is an RFC 9457 problem.

Requests carry real credentials so that they get past authentication into the handlers: a
full-scope access key on the relying-party API, and on the device API a request signed by
an enrolled phone over the exact bytes sent. ``TAPSIGN_FUZZ_EXAMPLES`` sets the cases per
route (``make fuzz`` runs many more than the suite).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tapsign_sdk.client import Client
from tapsign_sdk.device import Device
from tapsign_sdk.request import sign_headers
from tests.e2e.serving import Server, postgres_schema, serving
from tests.e2e.test_flows import enrolled

EXAMPLES = int(os.environ.get("TAPSIGN_FUZZ_EXAMPLES", "15"))
#: The databases to fuzz against: SQLite in the suite, both in ``make fuzz``.
DATABASES = os.environ.get("TAPSIGN_FUZZ_DATABASES", "sqlite").split(",")
PROBLEM = "application/problem+json"
#: Ids of a real user, device and transaction, filled in by the ``target`` fixture.
known: dict[str, str] = {}


@pytest.fixture(scope="module", params=DATABASES)
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Device]]:
    """A server of its own (fuzzing spends the device API's address budget), on SQLite or
    PostgreSQL, and an enrolled phone to sign device requests with."""
    with contextlib.ExitStack() as stack:
        config = ""
        if request.param == "postgresql":
            config = f'[database]\nurl = "{stack.enter_context(postgres_schema())}"\n'
        server = stack.enter_context(serving(tmp_path_factory.mktemp("fuzz"), config=config))
        phone, victim = Device(server.url), Device(server.url)
        with Client(server.url, server.access_key) as client:
            enrolled(client, phone)
            user = client.find_user(enrolled(client, victim))
            started = client.approve(user_id=user.user_id)
        # Cases with these real ids get past the lookups into the handlers.
        known["userId"] = str(user.user_id)
        known["authenticatorId"] = str(victim.authenticator_id)
        known["transactionId"] = str(started.transaction_id)
        yield server, phone
        phone.close()
        victim.close()


@pytest.fixture(scope="module")
def api_schema(target: tuple[Server, Device]) -> Any:
    server, _ = target
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_no_request_gets_a_5xx_and_every_refusal_is_a_problem(
    api_schema: Any, target: tuple[Server, Device]
) -> None:
    """Valid and invalid requests (schemathesis's positive and negative modes) to every
    route; the counts per route are printed (pytest -s)."""
    server, phone = target
    sent: Counter[str] = Counter()
    statuses: Counter[int] = Counter()

    def send(case: Any) -> None:
        response = _send(case, server, phone)
        sent[case.operation.label] += 1
        statuses[response.status_code] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400:
            assert response.headers["content-type"] == PROBLEM, case.as_curl_command()
            problem = response.json()
            assert problem["status"] == response.status_code
            assert problem["type"].startswith("https://tapsign.dev/problems/")
            assert problem["title"]

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 28  # every route of the document
    for operation in operations:
        strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
        names = [parameter["name"] for parameter in operation.definition.raw.get("parameters", [])]
        if names and all(name in known for name in names):
            real = {name: known[name] for name in names}
            strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real))
        if operation.definition.raw.get("parameters") or "requestBody" in operation.definition.raw:
            strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))
        run = settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )(given(st.one_of(strategies))(send))
        run()
    print(f"\nfuzz cases per route ({sum(sent.values())} in all, statuses {dict(statuses)}):")
    for label, count in sorted(sent.items()):
        print(f"  {count:5d}  {label}")
    assert set(sent) == {operation.label for operation in operations}


def _send(case: Any, server: Server, phone: Device) -> httpx.Response:
    """``case`` as sent by a client with real credentials."""
    request = case.as_transport_kwargs(base_url=server.url)
    # The generated credentials would end at the door: send real ones.
    headers = {
        name: value
        for name, value in (request.get("headers") or {}).items()
        if name.lower() != "authorization"
    }
    body = _body(request, headers)
    schemes = {next(iter(option)) for option in case.operation.definition.raw["security"]}
    if "accessKey" in schemes:
        headers["Authorization"] = f"Bearer {server.access_key}"
    if "deviceSignature" in schemes:
        assert phone.authenticator_id is not None
        headers |= sign_headers(
            authenticator_id=phone.authenticator_id,
            signer=phone.authenticator,
            method=request["method"],
            path=httpx.URL(request["url"], params=request.get("params")).raw_path.decode(),
            body=body,
        )
    try:
        return httpx.request(
            request["method"],
            request["url"],
            headers=headers,
            content=body,
            params=request.get("params"),
            timeout=60,
        )
    except httpx.LocalProtocolError:  # e.g. a header value HTTP cannot carry: never sent
        reject()


def _body(request: dict[str, Any], headers: dict[str, str]) -> bytes:
    """The exact bytes to send (and to sign)."""
    if "json" in request:
        headers.setdefault("Content-Type", "application/json")
        return json.dumps(request["json"]).encode()
    data = request.get("data")
    if isinstance(data, dict):
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        return str(httpx.QueryParams(data)).encode()
    if isinstance(data, str):
        return data.encode()
    return data or b""


#: What an HTTP/1.1 header value can carry: visible ASCII and inner spaces.
HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120).map(
    str.strip
)


@given(
    headers=st.fixed_dictionaries(
        {},
        optional={
            "Tapsign-Authenticator": HEADER_VALUE | st.uuids().map(str),
            "Tapsign-Timestamp": HEADER_VALUE | st.integers(-(2**40), 2**40).map(str),
            "Tapsign-Nonce": HEADER_VALUE,
            "Tapsign-Signature": HEADER_VALUE,
            "Authorization": HEADER_VALUE,
        },
    ),
    method=st.sampled_from(["GET", "POST"]),
)
@settings(max_examples=EXAMPLES * 4, deadline=None, suppress_health_check=list(HealthCheck))
def test_forged_device_request_headers_get_a_generic_401(
    target: tuple[Server, Device], headers: dict[str, str], method: str
) -> None:
    server, phone = target
    if phone.authenticator_id is not None and headers.get("Tapsign-Authenticator") == "":
        headers["Tapsign-Authenticator"] = str(phone.authenticator_id)  # a real id, forged rest
    path = (
        "/device/v1/operations"
        if method == "GET"
        else f"/device/v1/operations/{known['transactionId']}/answer"
    )
    response = httpx.request(
        method, server.url + path, headers=headers, content=b"{}" if method == "POST" else b""
    )
    assert response.status_code in (401, 429), response.text
    assert response.headers["content-type"] == PROBLEM
    if response.status_code == 401:
        assert response.json()["detail"] == "authentication failed"
