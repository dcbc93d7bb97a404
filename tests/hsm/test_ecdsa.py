"""P-256 key and signature formats."""

from __future__ import annotations

import contextlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import given
from hypothesis import strategies as st

from hsm import ecdsa
from hsm.errors import InvalidPublicKey

PRIVATE = ec.generate_private_key(ec.SECP256R1())
PUBLIC = PRIVATE.public_key()
POINT = PUBLIC.public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
)
SPKI = PUBLIC.public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
INVALID_KEY = r"^not a P-256 public key \(uncompressed point or SPKI DER\)$"


def test_point_and_spki_load_the_same_key() -> None:
    assert ecdsa.encode_point(ecdsa.load_public_key(POINT)) == POINT
    assert ecdsa.encode_point(ecdsa.load_public_key(SPKI)) == POINT


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(POINT[:-1], id="truncated point"),
        pytest.param(POINT[:-1] + bytes([POINT[-1] ^ 1]), id="point off the curve"),
        pytest.param(
            PUBLIC.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
            ),
            id="compressed point",
        ),
        pytest.param(SPKI[:-3], id="truncated SPKI"),
        pytest.param(
            ec.generate_private_key(ec.SECP384R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            id="P-384 SPKI",
        ),
        pytest.param(b"\x04" + bytes(64), id="point at zero"),
        pytest.param(b"\x30" * 91, id="garbage"),
    ],
)
def test_malformed_public_keys_are_rejected(data: bytes) -> None:
    with pytest.raises(InvalidPublicKey, match=INVALID_KEY):
        ecdsa.load_public_key(data)


def test_der_and_raw_signatures_convert_both_ways() -> None:
    der = PRIVATE.sign(b"m", ec.ECDSA(hashes.SHA256()))
    raw = ecdsa.raw_signature(der)
    assert raw is not None
    assert len(raw) == 64
    assert ecdsa.raw_signature(raw) == raw
    assert ecdsa.der_signature(raw) == der
    assert ecdsa.der_signature(der) == der


def test_raw_signature_that_starts_like_der_is_still_raw() -> None:
    r = int.from_bytes(b"\x30\x3e\x02" + bytes(29), "big") + 5
    raw = r.to_bytes(32, "big") + (7).to_bytes(32, "big")
    assert ecdsa.signature_scalars(raw) == (r, 7)


@pytest.mark.parametrize(
    "signature",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes(63), id="63 bytes"),
        pytest.param(bytes(65), id="65 bytes"),
        pytest.param(bytes(64), id="r = s = 0"),
        pytest.param(ecdsa.P256_ORDER.to_bytes(32, "big") + (1).to_bytes(32, "big"), id="r = n"),
        pytest.param((1).to_bytes(32, "big") + ecdsa.P256_ORDER.to_bytes(32, "big"), id="s = n"),
        pytest.param(encode_dss_signature(1, 1)[:-1], id="truncated DER"),
        pytest.param(encode_dss_signature(1, 1) + b"\x00", id="DER with trailing byte"),
        pytest.param(bytes.fromhex("30060201ff020101"), id="negative r"),
        pytest.param(encode_dss_signature(2**256, 1), id="r wider than 256 bits"),
    ],
)
def test_malformed_signatures_are_none(signature: bytes) -> None:
    assert ecdsa.signature_scalars(signature) is None
    assert ecdsa.raw_signature(signature) is None
    assert ecdsa.der_signature(signature) is None


def test_high_s_signature_is_kept_as_is() -> None:
    """Phones do not normalise S; single-use challenges, not low-S, stop replays."""
    r, s = decode_dss_signature(PRIVATE.sign(b"m", ec.ECDSA(hashes.SHA256())))
    high = max(s, ecdsa.P256_ORDER - s)
    assert ecdsa.signature_scalars(encode_dss_signature(r, high)) == (r, high)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    scalars = ecdsa.signature_scalars(data)
    if scalars is not None:
        r, s = scalars
        assert 0 < r < ecdsa.P256_ORDER
        assert 0 < s < ecdsa.P256_ORDER
    with contextlib.suppress(InvalidPublicKey):
        ecdsa.load_public_key(data)
