"""Enrolment with device-key attestation required (checklist item 8), end to end: a real
server whose ``[attestation]`` trusts the test authorities of tests/attestations.py, and
SDK phones that attest their keys - or do not, or attest badly."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from functools import partial

import httpx
import pytest

from tapsign_sdk.client import Client
from tapsign_sdk.device import Attester, Authenticator, Device
from tests.attestations import APP_ID, AndroidKeystore, AppAttestService, pem_file
from tests.e2e.serving import Server, serving

KEYSTORE = AndroidKeystore()
APPLE = AppAttestService()


@pytest.fixture(scope="module")
def attesting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that enrols only attested devices."""
    directory = tmp_path_factory.mktemp("attesting")
    config = (
        "[attestation]\n"
        'policy = "required"\n'
        f'android_roots = "{pem_file(directory / "android-roots.pem", KEYSTORE.root)}"\n'
        f'apple_root = "{pem_file(directory / "apple-root.pem", APPLE.root)}"\n'
        f'apple_app_ids = ["{APP_ID}"]\n'
        'android_packages = ["com.example.bank"]\n'
    )
    with serving(directory, config=config) as running:
        yield running


def enrol(server: Server, attester: Attester | None, username: str = "") -> tuple[str, str, Device]:
    """(status the relying party sees, reason told to the phone, the phone)."""
    username = username or f"user-{secrets.token_hex(5)}"
    phone = Device(server.url, authenticator=Authenticator(attester=attester))
    with Client(server.url, server.access_key) as client:
        started = client.enroll(username=username)
        told = phone.enroll(started.enrollment.app_link_uri)
        status = client.wait_for_result(started.enrollment.status_token)
    seen = status.status if status.reason is None else f"{status.status}:{status.reason}"
    return seen, told.reason or told.status, phone


def refusals(server: Server) -> list[str]:
    with sqlite3.connect(server.directory / "var" / "tapsign.db") as database:
        rows = database.execute(
            "SELECT reason FROM audit_log WHERE action = 'device.attestation-refused'"
        ).fetchall()
    return [reason for (reason,) in rows]


def test_an_attested_android_phone_enrols_and_signs(attesting: Server) -> None:
    username = f"user-{secrets.token_hex(5)}"
    status, told, phone = enrol(attesting, partial(KEYSTORE.attest, security_level=2), username)
    assert (status, told) == ("succeeded", "succeeded")
    with Client(attesting.url, attesting.access_key) as client:
        assert phone.authenticator_id is not None
        authenticator = client.get_authenticator(phone.authenticator_id)
        assert authenticator.attestation == "android-key/strongbox"
        shown = attesting.tapsign("devices", "show", str(phone.authenticator_id)).stdout
        assert "attestation android-key/strongbox" in shown
        # The attested key goes on to authenticate like any other.
        started = client.approve(username=username, message="Log in")
        (operation,) = phone.pending()
        phone.approve(operation)
        assert client.wait_for_result(started.status_token).status == "succeeded"
    phone.close()


def test_an_attested_iphone_enrols(attesting: Server) -> None:
    status, told, phone = enrol(attesting, APPLE.attest)
    assert (status, told) == ("succeeded", "succeeded")
    with Client(attesting.url, attesting.access_key) as client:
        assert phone.authenticator_id is not None
        assert client.get_authenticator(phone.authenticator_id).attestation == "apple-appattest"
    phone.close()


@pytest.mark.parametrize(
    ("attester", "audited"),
    [
        (None, "no attestation, and one is required"),
        (AndroidKeystore().attest, "does not end at a trusted root"),
        (partial(KEYSTORE.attest, security_level=0), "is below trusted-environment"),
        (partial(KEYSTORE.attest, package="com.example.clone"), "is not allowed"),
        (partial(APPLE.attest, app_id="OTHERTEAM1.com.example.bank"), "App ID is not allowed"),
        (
            lambda challenge, key: KEYSTORE.attest(secrets.token_bytes(32), key),
            "challenge is not the transaction's",
        ),
    ],
    ids=["none", "foreign-root", "software-key", "other-app", "other-app-id", "old-challenge"],
)
def test_checklist_8_enrolment_without_a_valid_attestation_fails(
    attesting: Server, attester: Attester | None, audited: str
) -> None:
    """Generic to the phone, specific to the relying party's status and the audit trail;
    the phone is not enrolled."""
    before = len(refusals(attesting))
    status, told, phone = enrol(attesting, attester)
    assert (status, told) == ("failed:attestation-failed", "authentication-failed")
    assert phone.authenticator_id is None
    (reason,) = refusals(attesting)[before:]
    assert audited in reason
    phone.close()


def test_a_malformed_attestation_is_a_clear_422(attesting: Server) -> None:
    with Client(attesting.url, attesting.access_key) as client:
        started = client.enroll(username=f"user-{secrets.token_hex(5)}")
    phone = Device(attesting.url)
    operation = phone.redeem(started.enrollment.app_link_uri)
    token = phone.dispatch_token(started.enrollment.app_link_uri)
    for attestation, field in (
        ({"format": "tpm", "certificateChain": ["AA=="]}, "format"),
        ({"format": "android-key", "certificateChain": []}, "certificateChain"),
        ({"format": "apple-appattest", "keyId": "not base64!"}, "keyId"),
    ):
        response = httpx.post(
            f"{attesting.url}/device/v1/operations/{operation.id}/answer",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "decision": "approve",
                "userVerification": "biometric",
                "counter": 1,
                "signature": "AA==",
                "publicKey": "AA==",
                "attestation": attestation,
            },
        )
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert field in response.text
    # Nothing was taken: the enrolment still waits for a good answer.
    assert phone.enroll(started.enrollment.app_link_uri).status == "failed"  # no attestation
    phone.close()
