"""Routes in process (tests/api/conftest.py): what an app registers and answers."""

from __future__ import annotations

from pathlib import Path

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
