"""Device-key attestation (engine/attestation.py): every check refuses what it should, with
Android chains and App Attest statements built by the test authorities of
tests/attestations.py, and Google's and Apple's shipped roots load and anchor nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import cbor2
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.attestation import (
    KEY_DESCRIPTION_OID,
    AttestationRefused,
    Attestor,
    der_items,
    load_roots,
)
from engine.settings import AttestationSettings
from tapsign_sdk.device import Authenticator
from tapsign_sdk.model import AndroidKeyAttestation, AppleAppAttestation
from tapsign_sdk.problems import ConfigurationError
from tests.attestations import (
    APP_ID,
    NOW,
    AndroidKeystore,
    AppAttestService,
    certificate,
    der,
    key_description,
    pem_file,
    point_key,
)

CHALLENGE = secrets.token_bytes(32)


@pytest.fixture(scope="module")
def keystore() -> AndroidKeystore:
    return AndroidKeystore()


@pytest.fixture(scope="module")
def apple() -> AppAttestService:
    return AppAttestService()


@pytest.fixture
def key() -> bytes:
    return Authenticator().public_key


def attestor(
    tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService, **options: Any
) -> Attestor:
    return Attestor(
        AttestationSettings(
            android_roots=pem_file(tmp_path / "android.pem", keystore.root),
            apple_root=pem_file(tmp_path / "apple.pem", apple.root),
            apple_app_ids=[APP_ID],
            **options,
        )
    )


@pytest.fixture
def checker(tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService) -> Attestor:
    return attestor(tmp_path, keystore, apple)


def check(checker: Attestor, attestation: Any, key: bytes) -> str:
    return checker.check(attestation, challenge=CHALLENGE, public_key=key, now=NOW)


# -- Android ---------------------------------------------------------------------------


def test_an_android_key_in_the_tee_is_attested(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    assert check(checker, keystore.attest(CHALLENGE, key), key) == (
        "android-key/trusted-environment"
    )
    # The phone may leave the root out of the chain; the configured root anchors it.
    assert check(checker, keystore.attest(CHALLENGE, key, include_root=False), key)


def test_strongbox_is_named_and_can_be_required(
    tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService, key: bytes
) -> None:
    strict = attestor(tmp_path, keystore, apple, android_min_security_level="strongbox")
    assert check(strict, keystore.attest(CHALLENGE, key, security_level=2), key) == (
        "android-key/strongbox"
    )
    with pytest.raises(AttestationRefused, match="below strongbox"):
        check(strict, keystore.attest(CHALLENGE, key, security_level=1), key)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"security_level": 0}, "below trusted-environment"),  # software keystore
        ({"purposes": (3,)}, "not a hardware-enforced signing key"),
        ({"algorithm": 1}, "not a hardware-enforced EC key"),  # RSA
        ({"curve": 2}, "not on P-256"),
        ({"origin": 2}, "not generated in the secure hardware"),  # imported
        ({"locked": False}, "not in verified boot"),
        ({"boot_state": 2}, "not in verified boot"),  # unverified boot
    ],
)
def test_android_key_properties_are_enforced(
    checker: Attestor,
    keystore: AndroidKeystore,
    key: bytes,
    fields: dict[str, Any],
    reason: str,
) -> None:
    with pytest.raises(AttestationRefused, match=reason):
        check(checker, keystore.attest(CHALLENGE, key, **fields), key)


def test_verified_boot_can_be_switched_off(
    tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService, key: bytes
) -> None:
    lenient = attestor(tmp_path, keystore, apple, android_verified_boot=False)
    assert check(lenient, keystore.attest(CHALLENGE, key, locked=False, boot_state=2), key)


def test_the_challenge_and_the_key_are_bound(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    with pytest.raises(AttestationRefused, match="challenge is not the transaction's"):
        check(checker, keystore.attest(secrets.token_bytes(32), key), key)
    other = Authenticator().public_key
    with pytest.raises(AttestationRefused, match="does not certify the enrolled key"):
        check(checker, keystore.attest(CHALLENGE, other), key)


def test_a_chain_from_another_root_is_refused(checker: Attestor, key: bytes) -> None:
    with pytest.raises(AttestationRefused, match="does not end at a trusted root"):
        check(checker, AndroidKeystore("Test Attestation Root").attest(CHALLENGE, key), key)


def test_a_forged_link_in_the_chain_is_refused(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    genuine = keystore.attest(CHALLENGE, key).certificate_chain
    forger = AndroidKeystore()  # same names, other keys: the signatures do not verify
    forged = forger.attest(CHALLENGE, key).certificate_chain
    with pytest.raises(AttestationRefused, match="is not issued by"):
        check(checker, AndroidKeyAttestation(certificate_chain=[forged[0], *genuine[1:]]), key)


def test_expired_certificates_are_refused(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    leaf = keystore.leaf(
        key,
        key_description(CHALLENGE),
        not_before=NOW - timedelta(days=10),
        not_after=NOW - timedelta(days=1),
    )
    chain = [der(leaf), der(keystore.intermediate)]
    with pytest.raises(AttestationRefused, match="is not valid at"):
        check(checker, AndroidKeyAttestation(certificate_chain=chain), key)


def test_a_leaf_from_a_phone_whose_clock_runs_ahead_is_accepted(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    leaf = keystore.leaf(key, key_description(CHALLENGE), not_before=NOW + timedelta(minutes=2))
    chain = [der(leaf), der(keystore.intermediate)]
    assert check(checker, AndroidKeyAttestation(certificate_chain=chain), key)


def test_an_issuer_that_is_not_a_ca_is_refused(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    not_ca_key = ec.generate_private_key(ec.SECP256R1())
    not_ca = certificate(
        "Not a CA",
        not_ca_key.public_key(),
        "Test Attestation Intermediate",
        keystore.intermediate_key,
        ca=False,
    )
    leaf = certificate(
        "Android Keystore Key",
        point_key(key),
        "Not a CA",
        not_ca_key,
        ca=False,
        extensions=(x509.UnrecognizedExtension(KEY_DESCRIPTION_OID, key_description(CHALLENGE)),),
    )
    chain = [der(leaf), der(not_ca), der(keystore.intermediate)]
    with pytest.raises(AttestationRefused, match="is not a CA"):
        check(checker, AndroidKeyAttestation(certificate_chain=chain), key)


def test_a_key_description_outside_the_leaf_is_refused(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    """An attested key that signs a certificate of its own (were a Keystore ever to mark it
    a CA): the forged leaf would carry any description the attacker likes."""
    attested_private = ec.generate_private_key(ec.SECP256R1())
    description = x509.UnrecognizedExtension(KEY_DESCRIPTION_OID, key_description(CHALLENGE))
    attested = certificate(
        "Android Keystore Key",
        attested_private.public_key(),
        "Test Attestation Intermediate",
        keystore.intermediate_key,
        ca=True,
        extensions=(description,),
    )
    forged_leaf = certificate(
        "forged",
        point_key(key),
        "Android Keystore Key",
        attested_private,
        ca=False,
        extensions=(description,),
    )
    chain = [der(forged_leaf), der(attested), der(keystore.intermediate)]
    with pytest.raises(AttestationRefused, match="CA certificate carries a key description"):
        check(checker, AndroidKeyAttestation(certificate_chain=chain), key)


def test_the_app_identity_can_be_required(
    tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService, key: bytes
) -> None:
    digest = hashlib.sha256(b"the bank's signing certificate").hexdigest()
    pinned = attestor(
        tmp_path,
        keystore,
        apple,
        android_packages=["com.example.bank"],
        android_signing_digests=[digest],
    )
    assert check(pinned, keystore.attest(CHALLENGE, key), key)
    with pytest.raises(AttestationRefused, match="is not allowed"):
        check(pinned, keystore.attest(CHALLENGE, key, package="com.example.malware"), key)
    with pytest.raises(AttestationRefused, match="signing certificate is not allowed"):
        check(pinned, keystore.attest(CHALLENGE, key, signing_digest=bytes(32)), key)


def test_revoked_certificates_are_refused_and_the_list_is_reread(
    tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService, key: bytes
) -> None:
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"entries": {"1": {"status": "REVOKED"}}}))
    checker = attestor(tmp_path, keystore, apple, android_revocation_list=str(status))
    assert check(checker, keystore.attest(CHALLENGE, key), key)
    serial = format(keystore.intermediate.serial_number, "x")
    status.write_text(
        json.dumps({"entries": {serial: {"status": "REVOKED", "reason": "KEY_COMPROMISE"}}})
    )
    os.utime(status, ns=(0, 1))  # a different modification time, whatever the clock
    with pytest.raises(AttestationRefused, match="is REVOKED"):
        check(checker, keystore.attest(CHALLENGE, key), key)


def test_an_unreadable_status_list_is_a_configuration_error(
    tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService
) -> None:
    broken = tmp_path / "status.json"
    broken.write_text("not json")
    with pytest.raises(ConfigurationError, match="status list"):
        attestor(tmp_path, keystore, apple, android_revocation_list=str(broken))


# -- Apple -----------------------------------------------------------------------------


def test_an_app_attest_statement_binds_challenge_and_key(
    checker: Attestor, apple: AppAttestService, key: bytes
) -> None:
    assert check(checker, apple.attest(CHALLENGE, key), key) == "apple-appattest"
    with pytest.raises(AttestationRefused, match="nonce does not bind"):
        check(checker, apple.attest(secrets.token_bytes(32), key), key)
    with pytest.raises(AttestationRefused, match="nonce does not bind"):
        check(checker, apple.attest(CHALLENGE, Authenticator().public_key), key)


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"app_id": "TEAM123456.com.example.other"}, "App ID is not allowed"),
        ({"environment": "development"}, "is not the production one"),
        ({"counter": 1}, "counter is 1"),
        ({"key_id": bytes(32)}, "keyId is not"),
    ],
)
def test_app_attest_fields_are_checked(
    checker: Attestor,
    apple: AppAttestService,
    key: bytes,
    options: dict[str, Any],
    reason: str,
) -> None:
    with pytest.raises(AttestationRefused, match=reason):
        check(checker, apple.attest(CHALLENGE, key, **options), key)


def test_app_attest_from_another_root_or_unconfigured_is_refused(
    tmp_path: Path, keystore: AndroidKeystore, apple: AppAttestService, key: bytes
) -> None:
    checker = attestor(tmp_path, keystore, apple)
    with pytest.raises(AttestationRefused, match="does not end at a trusted root"):
        check(checker, AppAttestService().attest(CHALLENGE, key), key)
    unconfigured = Attestor(
        AttestationSettings(apple_root=pem_file(tmp_path / "a.pem", apple.root))
    )
    with pytest.raises(AttestationRefused, match="no App ID is configured"):
        check(unconfigured, apple.attest(CHALLENGE, key), key)


def test_malformed_app_attest_objects_are_refused(
    checker: Attestor, apple: AppAttestService, key: bytes
) -> None:
    genuine = cbor2.loads(apple.attest(CHALLENGE, key).attestation_object)
    for broken in (
        b"\xff\x00",
        cbor2.dumps({"fmt": "packed", **{k: v for k, v in genuine.items() if k != "fmt"}}),
        cbor2.dumps({**genuine, "authData": genuine["authData"][:40]}),
        cbor2.dumps({**genuine, "attStmt": {"x5c": "not a list"}}),
        cbor2.dumps([1, 2, 3]),
    ):
        with pytest.raises(AttestationRefused):
            check(checker, AppleAppAttestation(key_id=bytes(32), attestation_object=broken), key)


# -- shipped roots, hostile bytes ------------------------------------------------------


def test_the_shipped_roots_are_google_s_and_apple_s(key: bytes) -> None:
    """The PEM files in engine/attestation_roots hold the published roots (their SHA-256
    as Google and Apple publish them), self-signed, and anchor nothing of ours."""
    google = load_roots(None, "google.pem")
    apple = load_roots(None, "apple.pem")
    assert [c.subject.rfc4514_string() for c in google] == [
        "2.5.4.5=f92009e853b6b045",  # the RSA key of every Google root since 2016
        "C=US,O=Google LLC,OU=Android,CN=Key Attestation CA1",  # the EC root of 2025
    ]
    assert [hashlib.sha256(der(c)).hexdigest() for c in apple] == [
        "1cb9823ba28ba6ad2d33a006941de2ae4f513ef1d4e831b9f7e0fa7b6242c932"
    ]
    for root in (*google, *apple):
        root.verify_directly_issued_by(root)
    shipped = Attestor(AttestationSettings(apple_app_ids=[APP_ID]))
    with pytest.raises(AttestationRefused, match="does not end at a trusted root"):
        check(shipped, AndroidKeystore().attest(CHALLENGE, key), key)
    with pytest.raises(AttestationRefused, match="does not end at a trusted root"):
        check(shipped, AppAttestService().attest(CHALLENGE, key), key)


def test_missing_root_files_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read attestation roots"):
        Attestor(AttestationSettings(android_roots=str(tmp_path / "missing.pem")))
    (tmp_path / "empty.pem").write_text("nothing here")
    with pytest.raises(ConfigurationError, match="are not PEM"):
        Attestor(AttestationSettings(apple_root=str(tmp_path / "empty.pem")))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_the_der_reader_refuses_garbage_cleanly(data: bytes) -> None:
    try:
        for item in der_items(data):
            assert len(item.value) <= len(data)
    except AttestationRefused:
        pass


@settings(max_examples=100, deadline=None)
@given(chain=st.lists(st.binary(max_size=300), min_size=1, max_size=3), obj=st.binary(max_size=300))
def test_hostile_attestations_are_refused_never_crash(chain: list[bytes], obj: bytes) -> None:
    checker = Attestor(AttestationSettings(apple_app_ids=[APP_ID]))
    key = Authenticator().public_key
    for attestation in (
        AndroidKeyAttestation(certificate_chain=chain),
        AppleAppAttestation(key_id=obj[:32], attestation_object=obj),
    ):
        with pytest.raises(AttestationRefused):
            check(checker, attestation, key)


def test_a_mutated_key_description_is_refused_or_unchanged(
    checker: Attestor, keystore: AndroidKeystore, key: bytes
) -> None:
    """Each byte of a genuine KeyDescription flipped in turn: refused, or (for bytes the
    checks do not read, such as the version numbers) the same verdict - never a crash."""
    genuine = key_description(CHALLENGE)
    for index in range(len(genuine)):
        mutated = bytearray(genuine)
        mutated[index] ^= 0x41
        try:
            verdict = check(
                checker, keystore.attest(CHALLENGE, key, description=bytes(mutated)), key
            )
        except AttestationRefused:
            continue
        assert verdict.startswith("android-key/")


def test_the_wire_form_names_the_format() -> None:
    attestation = msgspec.json.decode(
        b'{"format": "android-key", "certificateChain": ["AAE="]}',
        type=AndroidKeyAttestation | AppleAppAttestation,
    )
    assert attestation == AndroidKeyAttestation(certificate_chain=[b"\x00\x01"])
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"format": "tpm", "certificateChain": []}',
            type=AndroidKeyAttestation | AppleAppAttestation,
        )
