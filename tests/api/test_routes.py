"""Routes in process (tests/api/conftest.py): what an app registers and answers, and every
bad request refused with a problem that says what was wrong."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from api.routing import routes_of
from api.server import build_app
from hsm.settings import HsmSettings
from tests.api.conftest import InProcess, app_settings
from tests.conftest import USER_PIN

PROBLEM = "application/problem+json"


async def test_each_app_has_its_own_route_table(
    in_process: InProcess, hsm_settings: HsmSettings, tmp_path: Path
) -> None:
    """A second app in the same process neither doubles the first one's routes nor its
    OpenAPI document (the table was a module-level list)."""
    first = routes_of(in_process.app)
    keys = [(spec.method, spec.path) for spec in first]
    assert len(keys) == len(set(keys)) >= 28

    (tmp_path / "second").mkdir()
    second = build_app(
        app_settings(hsm_settings, tmp_path / "second"), {"TAPSIGN_HSM_PIN": USER_PIN}
    )
    assert [(spec.method, spec.path) for spec in routes_of(second)] == keys
    assert routes_of(in_process.app) == first

    response = await in_process.client.get("/openapi.json")
    document = await response.get_json()
    operations = [
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    ]
    assert sorted(operations) == sorted(keys)


async def test_a_bad_body_is_a_problem_naming_the_field(in_process: InProcess) -> None:
    response = await in_process.client.post(
        "/api/v1/approval",
        json={"username": "alice", "amount": "12.5x", "currency": "EUR"},
        headers=in_process.headers,
    )
    assert response.status_code == 422
    assert response.content_type == PROBLEM
    problem = await response.get_json()
    assert problem["field"] == "amount"


async def test_an_unknown_user_is_a_problem_and_the_app_goes_on(in_process: InProcess) -> None:
    response = await in_process.client.post(
        "/api/v1/approval", json={"username": "nobody"}, headers=in_process.headers
    )
    assert response.status_code == 404
    assert response.content_type == PROBLEM
    health = await in_process.client.get("/readyz")
    assert health.status_code == 200


UUID_ZERO = "00000000-0000-0000-0000-000000000000"


async def _routes(in_process: InProcess) -> list[tuple[str, str, str, bool]]:
    """``(method, path, security scheme, has a JSON body)`` of every documented route."""
    document = await (await in_process.client.get("/openapi.json")).get_json()
    found = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            schemes = [next(iter(option)) for option in operation["security"]]
            content = operation.get("requestBody", {}).get("content", {})
            found.append(
                (method.upper(), path, schemes[0] if schemes else "", "application/json" in content)
            )
    return found


def _concrete(template: str) -> str:
    for name in ("{transactionId}", "{userId}", "{authenticatorId}"):
        template = template.replace(name, UUID_ZERO)
    return template


async def test_the_openapi_document_is_valid_and_answers_for_every_route(
    in_process: InProcess,
) -> None:
    validate(await (await in_process.client.get("/openapi.json")).get_json())
    documented = await _routes(in_process)
    assert len(documented) >= 28
    for method, template, _, _ in documented:
        response = await in_process.client.open(_concrete(template), method=method)
        # Every documented route exists with its method: no 405, no "no such route" 404.
        assert response.status_code != 405, (method, template)
        if response.status_code == 404:
            problem = await response.get_json()
            assert problem["type"] != "https://tapsign.dev/problems/not-found"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "problem"),
    [
        (b"{not json", "application/json", 400, "bad-request"),
        (b"[]", "application/json", 422, "invalid-input"),
        (b'{"surprise": 1}', "application/json", 422, "invalid-input"),
        (b'{"x": ' * 5_000 + b"1" + b"}" * 5_000, "application/json", 422, "invalid-input"),
        (b"{}", "text/plain", 415, "unsupported-media-type"),
        (b"x" * 70_000, "application/json", 413, "request-entity-too-large"),
    ],
    ids=["malformed", "wrong-type", "unknown-field", "deeply-nested", "media-type", "too-large"],
)
async def test_every_json_endpoint_refuses_bad_bodies_with_a_problem(
    in_process: InProcess, body: bytes, content_type: str, status: int, problem: str
) -> None:
    checked = 0
    for method, template, scheme, has_body in await _routes(in_process):
        if not has_body:
            continue
        path = _concrete(template)
        headers = {"Content-Type": content_type}
        if scheme == "accessKey":
            headers.update(in_process.headers)
        elif scheme == "deviceSignature":
            headers.update(in_process.signed(method, path, body))
        response = await in_process.client.open(path, method=method, data=body, headers=headers)
        refusal = await response.get_json()
        assert response.status_code == status, (method, path, refusal)
        assert response.content_type == PROBLEM
        assert refusal["type"] == f"https://tapsign.dev/problems/{problem}"
        assert refusal["status"] == status
        checked += 1
    assert checked >= 9


async def test_bad_uuids_and_methods_and_unknown_paths(in_process: InProcess) -> None:
    for method, template, _, _ in await _routes(in_process):
        if "{" not in template:
            continue
        path = template.split("{")[0] + "not-a-uuid" + template.split("}")[1]
        response = await in_process.client.open(path, method=method, headers=in_process.headers)
        assert (response.status_code, response.content_type) == (404, PROBLEM), path
    wrong = await in_process.client.put("/api/v1/approval", headers=in_process.headers)
    assert (wrong.status_code, wrong.content_type) == (405, PROBLEM)
    missing = await in_process.client.get("/api/v2/nothing")
    assert (missing.status_code, missing.content_type) == (404, PROBLEM)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"amount": "-5", "currency": "EUR"}, "amount"),
        ({"amount": "1.00", "currency": "EURO"}, "currency"),
        ({"amount": "1.00", "currency": "XXX"}, "currency"),
        ({"expiresIn": 100_000}, "expiresIn"),
        ({"message": "m" * 501}, "message"),
        ({"authenticatorId": "not-a-uuid"}, "authenticatorId"),
        ({"requireUserVerification": "yes"}, "requireUserVerification"),
    ],
)
async def test_out_of_range_values_name_the_field(
    in_process: InProcess, fields: dict[str, Any], field: str
) -> None:
    payload = {"username": "alice", **fields}
    if "amount" in fields:
        payload["payee"] = {"name": "Shop", "account": "DE89"}
    response = await in_process.client.post(
        "/api/v1/approval", json=payload, headers=in_process.headers
    )
    assert (response.status_code, response.content_type) == (422, PROBLEM)
    assert (await response.get_json())["field"] == field


async def test_metrics_are_valid_prometheus_exposition(in_process: InProcess) -> None:
    """Parsed by Prometheus's own client library: every family has its type and help, every
    series names its worker, the counters a payment moves are there, and so are the
    histograms of requests per route, of complete transactions and of verifier batches."""
    started = await in_process.client.post(
        "/api/v1/approval", json={"username": "alice"}, headers=in_process.headers
    )
    transaction = (await started.get_json())["transactionId"]
    path = "/device/v1/operations"
    await in_process.client.get(path, headers=in_process.signed("GET", path, b""))
    await in_process.client.post(
        f"/api/v1/transactions/{transaction}/cancel", headers=in_process.headers
    )
    response = await in_process.client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=0.0.4")
    text = await response.get_data(as_text=True)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert all(family.documentation for family in families.values())
    assert all(
        sample.labels["worker"] == str(os.getpid())
        for family in families.values()
        for sample in family.samples
    )
    assert families["tapsign_requests_active"].type == "gauge"
    # The client library names a counter's family without its _total suffix.
    written = families["tapsign_database_writes"]
    assert written.type == "counter"
    (total,) = [sample.value for sample in written.samples if sample.name.endswith("_total")]
    assert total >= 1
    assert "tapsign_operations_started" in families

    def histogram(name: str, **labels: str) -> list[float]:
        """The cumulative bucket counts of one series, checked against its count."""
        family = families[name]
        assert family.type == "histogram"
        series = [s for s in family.samples if labels.items() <= s.labels.items()]
        buckets = [s.value for s in series if s.name.endswith("_bucket")]
        (count,) = [s.value for s in series if s.name.endswith("_count")]
        assert buckets == sorted(buckets)
        assert buckets[-1] == count
        return buckets

    assert (
        histogram("tapsign_request_duration_seconds", method="POST", route="/api/v1/approval")[-1]
        == 1
    )
    assert histogram("tapsign_transaction_duration_seconds", kind="authentication")[-1] == 1
    assert histogram("tapsign_verifier_batch_size")[-1] >= 1
