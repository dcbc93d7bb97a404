"""The keyring over a real SoftHSM2 token and over the software store."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, ObjectClass, exceptions

from hsm.errors import (
    DecryptionFailed,
    HsmPermanentError,
    HsmTransientError,
    KeyNotFound,
    KeyringError,
)
from hsm.keyring import KeyPurpose, Keyring, open_keyring
from hsm.keystores import Pkcs11KeyStore, SoftwareKeyStore
from hsm.pkcs11_token import Pkcs11Token, PooledSession, _function_list, session_handle
from hsm.settings import HsmSettings
from hsm.tokens import TokenSigner
from tests.conftest import USER_PIN, TokenFactory


def verifies(key: ec.EllipticCurvePublicKey | None, message: bytes, raw: bytes) -> bool:
    assert key is not None
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


@pytest.fixture
def keyring(token: Pkcs11Token) -> Keyring:
    return Keyring(Pkcs11KeyStore(token))


def test_ensure_creates_one_key_per_purpose_once(keyring: Keyring) -> None:
    created = keyring.ensure()
    assert sorted(key.purpose for key in created) == sorted(KeyPurpose)
    assert all(key.active for key in created)
    assert keyring.ensure() == []
    assert len(keyring.published()) == 4


def test_private_keys_are_sensitive_and_never_extractable(keyring: Keyring) -> None:
    """Checklist item 17 (PSD2 RTS art. 22(2)(b)-(c)): read the attributes back from the token."""
    keyring.ensure()
    store = keyring.store
    assert isinstance(store, Pkcs11KeyStore)
    for key in keyring.published():
        attributes = store.private_key_attributes(key.kid)
        assert attributes == {
            "TOKEN": True,
            "PRIVATE": True,
            "SENSITIVE": True,
            "ALWAYS_SENSITIVE": True,
            "EXTRACTABLE": False,
            "NEVER_EXTRACTABLE": True,
            "DERIVE": False,
            "LOCAL": True,
        }


def test_private_key_value_cannot_be_read(keyring: Keyring) -> None:
    keyring.ensure()
    kid = keyring.active(KeyPurpose.CONSENT).kid

    def read_value(pooled: PooledSession) -> object:
        key = pooled.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=kid.encode())
        return key[Attribute.VALUE]

    with pytest.raises(HsmPermanentError, match=r"^HSM operation failed \(AttributeSensitive\)$"):
        keyring.store.token.run(read_value)  # type: ignore[attr-defined]


def test_sign_is_es256_raw_r_s_by_the_active_key(keyring: Keyring) -> None:
    keyring.ensure()
    active = keyring.active(KeyPurpose.TOKEN)
    signature = keyring.sign(active.kid, b"header.payload")
    assert verifies(active.public_key, b"header.payload", signature)
    assert not verifies(active.public_key, b"header.payloaD", signature)
    other = keyring.active(KeyPurpose.CONSENT)
    assert not verifies(other.public_key, b"header.payload", signature)


def test_rotation_keeps_old_key_for_verification_until_retired(keyring: Keyring) -> None:
    keyring.ensure()
    old = keyring.active(KeyPurpose.CONSENT)
    signed_before = keyring.sign(old.kid, b"consent")

    new = keyring.rotate(KeyPurpose.CONSENT)

    assert new.kid > old.kid
    assert new.created >= old.created
    assert keyring.active(KeyPurpose.CONSENT) == new
    consent_keys = keyring.published(KeyPurpose.CONSENT)
    assert [(key.kid, key.active) for key in consent_keys] == [(new.kid, True), (old.kid, False)]
    assert {jwk["kid"] for jwk in keyring.jwks()["keys"]} >= {old.kid, new.kid}
    assert verifies(keyring.key(old.kid).public_key, b"consent", signed_before)

    with pytest.raises(KeyringError, match=r"^.* is the active consent-signing key: rotate first"):
        keyring.retire(new.kid)
    keyring.retire(old.kid)

    assert [key.kid for key in keyring.published(KeyPurpose.CONSENT)] == [new.kid]
    assert old.kid not in {jwk["kid"] for jwk in keyring.jwks()["keys"]}
    with pytest.raises(KeyNotFound, match=r"^no key with that kid$"):
        keyring.sign(old.kid, b"consent")
    # Destroyed on the token, not only forgotten by this keyring.
    assert old.kid not in {kid for _, kid, _ in keyring.store.load()}


def test_retire_unknown_kid(keyring: Keyring) -> None:
    with pytest.raises(KeyNotFound, match=r"^no key with that kid$"):
        keyring.retire("20260101T000000000000-00000000")


def test_active_without_keys_says_what_to_run(keyring: Keyring) -> None:
    with pytest.raises(KeyNotFound, match=r"^no callback-signing key: run 'tapsign hsm init'$"):
        keyring.active(KeyPurpose.CALLBACK)


def test_keys_are_token_objects_seen_by_a_new_keyring(
    keyring: Keyring, hsm_settings: HsmSettings
) -> None:
    keyring.ensure()
    # A second Pkcs11Token in this process shares the application's login (never logs out).
    again = open_keyring(hsm_settings, pin=USER_PIN)
    try:
        assert [key.kid for key in again.published()] == [key.kid for key in keyring.published()]
        assert again.jwks() == keyring.jwks()
    finally:
        again.close()
    # Closing the second token did not log the first one out.
    kid = keyring.active(KeyPurpose.TOKEN).kid
    assert verifies(keyring.key(kid).public_key, b"x", keyring.sign(kid, b"x"))


def test_a_host_without_softhsm2s_configuration_takes_no_lock_file(
    keyring: Keyring, hsm_settings: HsmSettings, tmp_path: Path
) -> None:
    """Another module (a network HSM) has no ``softhsm2.conf``, so no directory for the
    key-list lock file beside it: the key list is read and changed without one."""
    elsewhere = msgspec.structs.replace(
        hsm_settings, softhsm2_conf=str(tmp_path / "absent" / "softhsm2.conf")
    )
    host = open_keyring(elsewhere, pin=USER_PIN)
    try:
        host.ensure()
        keyring.refresh()  # the keys the host made are on the one token
        assert [key.kid for key in host.published()] == [key.kid for key in keyring.published()]
        assert host.published()
    finally:
        host.close()
    assert not (tmp_path / "absent").exists()


def test_jwks_is_public_ec_keys_with_kid_use_alg(keyring: Keyring) -> None:
    keyring.ensure()
    jwks = keyring.jwks()
    assert len(jwks["keys"]) == 3  # the data-encryption key has no public part
    for jwk in jwks["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")


def test_wrong_pin_is_refused_without_echoing_it(new_token: TokenFactory) -> None:
    token = new_token()
    label = token.token_label
    token.close()  # logs the application out of that token
    with pytest.raises(HsmPermanentError) as raised:
        Pkcs11Token(module=token.module_path, token_label=label, pin="not-the-pin-123")
    assert str(raised.value) == "HSM login refused: the configured PIN is wrong"


def test_missing_token_is_transient(token: Pkcs11Token) -> None:
    with pytest.raises(HsmTransientError, match=r"^no PKCS#11 token labelled 'absent' is present$"):
        Pkcs11Token(module=token.module_path, token_label="absent", pin=USER_PIN)


def test_missing_module_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(HsmPermanentError, match=r"^no PKCS#11 module at .*/missing\.so: install"):
        Pkcs11Token(module=str(tmp_path / "missing.so"), token_label="x", pin=USER_PIN)


def test_lost_session_is_replaced_and_the_operation_retried(keyring: Keyring) -> None:
    keyring.ensure()
    token = keyring.store.token  # type: ignore[attr-defined]
    assert isinstance(token, Pkcs11Token)
    kid = keyring.active(KeyPurpose.TOKEN).kid
    keyring.sign(kid, b"warm")  # a pooled session now caches the key handle

    def close_behind_the_pool(pooled: PooledSession) -> None:
        pooled.session.close()  # the handle is now invalid; the pool does not know

    token.run(close_behind_the_pool)
    signature = keyring.sign(kid, b"after")
    assert verifies(keyring.key(kid).public_key, b"after", signature)


@pytest.mark.parametrize("how", ["logged out", "login session closed"])
def test_lost_login_is_recovered(keyring: Keyring, how: str) -> None:
    keyring.ensure()
    token = keyring.store.token  # type: ignore[attr-defined]
    kid = keyring.active(KeyPurpose.TOKEN).kid
    login = token._login
    if how == "logged out":
        # C_Logout on any session logs the whole application out (PKCS#11 v2.40 §5.6);
        # private keys then vanish from searches and signing finds no key.
        assert _function_list(token.module_path).C_Logout(session_handle(login)) == 0
    else:
        login.close()
    signature = keyring.sign(kid, b"after logout")
    assert verifies(keyring.key(kid).public_key, b"after logout", signature)


def test_missing_key_with_intact_login_stays_missing(keyring: Keyring) -> None:
    with pytest.raises(KeyNotFound, match=r"^no such key on the HSM token$"):
        keyring.store.sign_digest(kid="20260101T000000000000-00000000", digest=bytes(32))


def test_pkcs11_errors_are_mapped_once(token: Pkcs11Token) -> None:
    def fail(_: PooledSession) -> None:
        raise exceptions.DeviceMemory()

    with pytest.raises(
        HsmTransientError, match=r"^HSM temporarily unable to serve \(DeviceMemory\)$"
    ):
        token.run(fail)


# -- software store ------------------------------------------------------------------------


def test_software_store_is_explicit_encrypted_and_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "keys"
    settings = HsmSettings(backend="software", software_key_dir=str(directory))
    with caplog.at_level(logging.WARNING, logger="hsm.keystores"):
        keyring = open_keyring(settings, pin="a passphrase")
    assert "not in an HSM" in caplog.text
    assert keyring.backend == "software"
    created = keyring.ensure()
    assert len(created) == 4
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert len(files) == 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        if path.suffix == ".pem":
            assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        else:
            assert len(path.read_bytes()) == 16  # a salt; the AES key is derived, never stored

    kid = keyring.active(KeyPurpose.CALLBACK).kid
    assert verifies(keyring.key(kid).public_key, b"m", keyring.sign(kid, b"m"))
    rotated = keyring.rotate(KeyPurpose.CALLBACK)
    keyring.retire(kid)
    assert len(list(directory.iterdir())) == 4
    sealed = keyring.encrypt(b"card PIN 1234", aad=b"operation 1")

    reopened = open_keyring(settings, pin="a passphrase")
    assert reopened.active(KeyPurpose.CALLBACK).kid == rotated.kid
    assert reopened.decrypt(sealed, aad=b"operation 1") == b"card PIN 1234"
    with pytest.raises(HsmPermanentError, match=r"^cannot decrypt the software key .*: wrong"):
        open_keyring(settings, pin="another passphrase")


def test_software_sign_unknown_kid(tmp_path: Path) -> None:
    store = SoftwareKeyStore(tmp_path, "pass")
    with pytest.raises(KeyNotFound, match=r"^no such software key$"):
        store.sign_digest(kid="nope", digest=bytes(32))


def test_data_encryption_in_the_hsm(keyring: Keyring) -> None:
    keyring.ensure()
    data_key = keyring.active(KeyPurpose.DATA)
    assert data_key.public_key is None
    store = keyring.store
    assert isinstance(store, Pkcs11KeyStore)
    attributes = store.private_key_attributes(data_key.kid)
    assert attributes["NEVER_EXTRACTABLE"]
    assert attributes["ALWAYS_SENSITIVE"]

    sealed = keyring.encrypt(b"card PIN 4321", aad=b"operation-1")
    assert b"4321" not in sealed
    assert sealed != keyring.encrypt(b"card PIN 4321", aad=b"operation-1")  # random nonces
    assert keyring.decrypt(sealed, aad=b"operation-1") == b"card PIN 4321"

    with pytest.raises(DecryptionFailed, match=r"^the encrypted data was altered or is not ours$"):
        keyring.decrypt(sealed, aad=b"operation-2")
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(DecryptionFailed, match=r"^the encrypted data was altered or is not ours$"):
        keyring.decrypt(tampered, aad=b"operation-1")
    with pytest.raises(DecryptionFailed, match=r"^not data encrypted by this keyring$"):
        keyring.decrypt(b"garbage", aad=b"operation-1")
    signing_kid = keyring.active(KeyPurpose.TOKEN).kid.encode()
    with pytest.raises(DecryptionFailed, match=r"^not data encrypted by this keyring$"):
        keyring.decrypt(signing_kid + sealed[sealed.index(b"\x00") :], aad=b"operation-1")

    keyring.rotate(KeyPurpose.DATA)
    assert keyring.decrypt(sealed, aad=b"operation-1") == b"card PIN 4321"
    keyring.retire(data_key.kid)
    with pytest.raises(KeyNotFound, match=r"^no key with that kid$"):
        keyring.decrypt(sealed, aad=b"operation-1")


def test_signing_follows_a_rotation_and_retirement_made_by_another_keyring(
    token: Pkcs11Token, tmp_path: Path
) -> None:
    """Another process (here another keyring on the token) rotates and retires: this one
    signs with the retired key until it finds the key gone, then reads the list again."""
    lock = tmp_path / "keyring.lock"
    ours = Keyring(Pkcs11KeyStore(token, lock=lock))
    ours.ensure()
    theirs = Keyring(Pkcs11KeyStore(token, lock=lock))
    old = ours.active(KeyPurpose.TOKEN).kid
    new = theirs.rotate(KeyPurpose.TOKEN).kid
    theirs.retire(old)
    assert ours.active(KeyPurpose.TOKEN).kid == old  # not read again yet
    signed = TokenSigner(ours, KeyPurpose.TOKEN, issuer="https://tapsign.test").encode({})
    assert jwt.get_unverified_header(signed)["kid"] == new
    assert [key.kid for key in ours.published(KeyPurpose.TOKEN)] == [new]
    assert lock.exists()
