"""ECDSA P-256 key and signature formats, defined once.

Public keys arrive as an X9.62 uncompressed point (``04 || X || Y``, what iOS
``SecKeyCopyExternalRepresentation`` returns) or as SPKI DER (what Android's
``getEncoded()`` returns). Signatures arrive as DER (both platforms' native output) or as
raw ``r || s`` (JOSE, RFC 7518 §3.4, and PKCS#11 ``CKM_ECDSA``).

Signature format detection: strict DER is tried first; a 64-byte value that is not DER is
raw ``r || s``. A genuine DER signature always parses as DER, and raw bytes parse as DER
only if the first three bytes happen to be ``30 3e 02`` *and* the lengths inside agree,
which no honest signer produces by design; either way the result is verified, not trusted.
High-S signatures are accepted: Secure Enclave and Android Keystore do not normalise S,
and replay is stopped by single-use challenges, not by signature uniqueness.
"""

from __future__ import annotations

import contextlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from hsm.errors import InvalidPublicKey

#: The order n of the P-256 base point (SEC 2 §2.4.2).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
POINT_LENGTH = 65
RAW_SIGNATURE_LENGTH = 64
#: DER ``OBJECT IDENTIFIER 1.2.840.10045.3.1.7`` (secp256r1), the ``CKA_EC_PARAMS`` of P-256.
P256_EC_PARAMS = bytes.fromhex("06082a8648ce3d030107")


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A validated P-256 public key from an uncompressed point or SPKI DER."""
    try:
        if len(data) == POINT_LENGTH and data[0] == 0x04:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidPublicKey("not a P-256 public key (uncompressed point or SPKI DER)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidPublicKey("not a P-256 public key (uncompressed point or SPKI DER)")
    return key


def encode_point(key: ec.EllipticCurvePublicKey) -> bytes:
    """The 65-byte X9.62 uncompressed point of ``key``."""
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def signature_scalars(signature: bytes) -> tuple[int, int] | None:
    """``(r, s)`` of a DER or raw signature, or None if it is malformed or out of range."""
    scalars = None
    if signature[:1] == b"\x30":  # a DER SEQUENCE, or raw r || s whose r starts with 0x30
        with contextlib.suppress(ValueError):
            scalars = decode_dss_signature(signature)
    if scalars is not None:
        r, s = scalars
    elif len(signature) == RAW_SIGNATURE_LENGTH:
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
    else:
        return None
    # SEC 1 §4.1.4 step 1: both must lie in [1, n-1] or the signature is invalid.
    if not (0 < r < P256_ORDER and 0 < s < P256_ORDER):
        return None
    return r, s


def raw_signature(signature: bytes) -> bytes | None:
    """The 64-byte ``r || s`` form (JOSE, ``CKM_ECDSA``), or None if malformed."""
    scalars = signature_scalars(signature)
    if scalars is None:
        return None
    return scalars[0].to_bytes(32, "big") + scalars[1].to_bytes(32, "big")


def der_signature(signature: bytes) -> bytes | None:
    """The DER form (OpenSSL, ``cryptography``), or None if malformed."""
    scalars = signature_scalars(signature)
    if scalars is None:
        return None
    return encode_dss_signature(*scalars)
