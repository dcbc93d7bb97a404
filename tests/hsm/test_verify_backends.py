"""Both verification backends, item by item, against cryptography's own verdict."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute, ObjectClass

from hsm import _p256, ecdsa
from hsm.errors import InvalidPublicKey
from hsm.pkcs11_token import Pkcs11Token, PooledSession
from hsm.verify_backends import (
    OpenSSLVerifyBackend,
    Pkcs11VerifyBackend,
    VerifyBackend,
)

KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)]


def point(private: ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def spki(private: ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def sign(private: ec.EllipticCurvePrivateKey, message: bytes, *, raw: bool = False) -> bytes:
    der = private.sign(message, ec.ECDSA(hashes.SHA256()))
    if not raw:
        return der
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.fixture(params=["openssl", "pkcs11"])
def backend(request: pytest.FixtureRequest) -> Iterator[VerifyBackend]:
    if request.param == "openssl":
        yield OpenSSLVerifyBackend()
    else:
        token: Pkcs11Token = request.getfixturevalue("token")
        yield Pkcs11VerifyBackend(token)


def test_valid_signatures_in_every_format(backend: VerifyBackend) -> None:
    key = KEYS[0]
    batch = [
        (point(key), b"der", sign(key, b"der")),
        (point(key), b"raw", sign(key, b"raw", raw=True)),
        (spki(key), b"spki", sign(key, b"spki")),
        (point(key), b"", sign(key, b"")),
        (point(key), b"x" * 5000, sign(key, b"x" * 5000, raw=True)),
    ]
    assert backend.verify_batch(batch) == [True] * 5


def test_wrong_and_malformed_signatures_are_false(backend: VerifyBackend) -> None:
    key, other = KEYS[0], KEYS[1]
    good = sign(key, b"pay 10 EUR")
    r, s = decode_dss_signature(good)
    batch = [
        (point(key), b"pay 11 EUR", good),
        (point(other), b"pay 10 EUR", good),
        (point(key), b"pay 10 EUR", good[:-1]),
        (point(key), b"pay 10 EUR", b""),
        (point(key), b"pay 10 EUR", bytes(64)),
        (point(key), b"pay 10 EUR", encode_dss_signature(r, (s + 1) % ecdsa.P256_ORDER)),
        (point(key), b"pay 10 EUR", good + b"\x00"),
    ]
    assert backend.verify_batch(batch) == [False] * len(batch)


def test_high_s_twin_of_a_valid_signature_verifies(backend: VerifyBackend) -> None:
    key = KEYS[2]
    r, s = decode_dss_signature(sign(key, b"m"))
    twin = encode_dss_signature(r, ecdsa.P256_ORDER - s)
    assert backend.verify_batch([(point(key), b"m", twin)]) == [True]


def test_malformed_key_fails_only_its_own_item(backend: VerifyBackend) -> None:
    key = KEYS[3]
    outcomes = backend.verify_batch(
        [
            (point(key), b"a", sign(key, b"a")),
            (b"\x04" + bytes(64), b"b", sign(key, b"b")),
            (point(key), b"c", sign(key, b"c")),
            (b"not a key", b"d", b"whatever"),
        ]
    )
    assert outcomes[0] is True
    assert outcomes[2] is True
    assert isinstance(outcomes[1], InvalidPublicKey)
    assert isinstance(outcomes[3], InvalidPublicKey)


def test_empty_batch(backend: VerifyBackend) -> None:
    assert backend.verify_batch([]) == []


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    message=st.binary(max_size=300),
    key_index=st.integers(0, len(KEYS) - 1),
    signer_index=st.integers(0, len(KEYS) - 1),
    raw=st.booleans(),
    flip=st.one_of(st.none(), st.integers(0, 63)),
)
def test_agrees_with_cryptography(
    backend: VerifyBackend,
    message: bytes,
    key_index: int,
    signer_index: int,
    raw: bool,
    flip: int | None,
) -> None:
    signature = bytearray(sign(KEYS[signer_index], message, raw=True))
    if flip is not None:
        signature[flip] ^= 0x01
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        KEYS[key_index].public_key().verify(
            encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256())
        )
        expected = 0 < r < ecdsa.P256_ORDER and 0 < s < ecdsa.P256_ORDER
    except Exception:
        expected = False
    presented = bytes(signature) if raw else encode_dss_signature(r, s)
    assert backend.verify_batch([(point(KEYS[key_index]), message, presented)]) == [expected]


def test_pkcs11_key_cache_is_bounded_per_session(token: Pkcs11Token) -> None:
    backend = Pkcs11VerifyBackend(token, key_cache=2)
    batch = [(point(key), b"m", sign(key, b"m")) for key in KEYS]
    assert backend.verify_batch(batch + batch) == [True] * (2 * len(KEYS))

    def session_public_keys(pooled: PooledSession) -> tuple[int, int]:
        objects = list(
            pooled.session.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.TOKEN: False}
            )
        )
        return len(pooled.public_keys), len(objects)

    cached, on_token = token.run(session_public_keys)
    assert cached == 2
    assert on_token == 2  # evicted keys are destroyed, not leaked in the session


def test_c_extension_rejects_malformed_items() -> None:
    with pytest.raises(TypeError, match=r"^verify_batch expects a tuple of items$"):
        _p256.verify_batch([])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^expected \(65-byte point, message bytes, 64-byte"):
        _p256.verify_batch(((b"\x04", b"", bytes(64)),))
    with pytest.raises(TypeError, match=r"^each item is a \(point, message, signature\) tuple$"):
        _p256.verify_batch((("a", "b"),))  # type: ignore[arg-type]
    # (0, 0) is not on the curve: libcrypto refuses the key, whatever the signature.
    assert _p256.verify_batch(((b"\x04" + bytes(64), b"m", bytes(64)),)) == b"\x02"
