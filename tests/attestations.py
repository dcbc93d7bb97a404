"""Test attestation authorities: an Android Keystore and an Apple App Attest service that
issue what real ones do (certificate chains with the KeyDescription extension, App Attest
CBOR statements), under their own roots - which a test configures as the trusted ones.
Real devices cannot run here; the formats and the checks are the real ones."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.attestation import APP_ATTEST_NONCE_OID, APPLE_AAGUIDS, KEY_DESCRIPTION_OID
from tapsign_sdk.model import AndroidKeyAttestation, AppleAppAttestation

# -- DER -------------------------------------------------------------------------------


def tlv(number: int, value: bytes, *, tag_class: int = 0, constructed: bool = False) -> bytes:
    first = tag_class << 6 | (0x20 if constructed else 0)
    if number < 0x1F:
        head = bytes([first | number])
    else:
        digits = [number & 0x7F]
        number >>= 7
        while number:
            digits.append(0x80 | number & 0x7F)
            number >>= 7
        head = bytes([first | 0x1F, *reversed(digits)])
    size = len(value)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return head + length + value


def sequence(*items: bytes) -> bytes:
    return tlv(0x10, b"".join(items), constructed=True)


def set_of(*items: bytes) -> bytes:
    return tlv(0x11, b"".join(sorted(items)), constructed=True)


def integer(value: int, *, number: int = 0x02) -> bytes:
    return tlv(number, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def enumerated(value: int) -> bytes:
    return integer(value, number=0x0A)


def octets(value: bytes) -> bytes:
    return tlv(0x04, value)


def explicit(number: int, inner: bytes) -> bytes:
    return tlv(number, inner, tag_class=2, constructed=True)


# -- certificates ----------------------------------------------------------------------

NOW = datetime.now(UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def certificate(
    subject: str,
    public_key: Any,
    issuer: str,
    issuer_key: Any,
    *,
    ca: bool,
    extensions: tuple[x509.ExtensionType, ...] = (),
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(days=1))
        .not_valid_after(not_after or NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem_file(path: Path, *certificates: x509.Certificate) -> str:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return str(path)


def point_key(public_key: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_key)


# -- Android ---------------------------------------------------------------------------


def key_description(
    challenge: bytes,
    *,
    security_level: int = 1,
    purposes: tuple[int, ...] = (2, 3),
    algorithm: int = 3,
    curve: int = 1,
    origin: int = 0,
    locked: bool = True,
    boot_state: int = 0,
    package: str = "com.example.bank",
    signing_digest: bytes = hashlib.sha256(b"the bank's signing certificate").digest(),
) -> bytes:
    """A KeyDescription (KeyMint attestation version 200) as a Keystore writes it."""
    application = sequence(
        set_of(sequence(octets(package.encode()), integer(7))),
        set_of(octets(signing_digest)),
    )
    software = sequence(explicit(709, octets(application)))
    root_of_trust = sequence(
        octets(bytes(32)),
        tlv(0x01, b"\xff" if locked else b"\x00"),
        enumerated(boot_state),
        octets(bytes(32)),
    )
    hardware = sequence(
        explicit(1, set_of(*(integer(p) for p in purposes))),
        explicit(2, integer(algorithm)),
        explicit(3, integer(256)),
        explicit(10, integer(curve)),
        explicit(503, tlv(0x05, b"")),
        explicit(702, integer(origin)),
        explicit(704, root_of_trust),
    )
    return sequence(
        integer(200),
        enumerated(security_level),
        integer(200),
        enumerated(security_level),
        octets(challenge),
        octets(b""),
        software,
        hardware,
    )


class Authority:
    """A root and an intermediate under it, as Google and Apple run them."""

    def __init__(self, root: str, intermediate: str) -> None:
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        self.root = certificate(root, self.root_key.public_key(), root, self.root_key, ca=True)
        self.intermediate_name = intermediate
        self.intermediate_key = ec.generate_private_key(ec.SECP384R1())
        self.intermediate = certificate(
            intermediate, self.intermediate_key.public_key(), root, self.root_key, ca=True
        )


class AndroidKeystore(Authority):
    """Google's role: attestation certificates of Keystore keys."""

    def __init__(self, root: str = "Test Attestation Root") -> None:
        super().__init__(root, "Test Attestation Intermediate")

    def leaf(self, public_key: bytes, description: bytes, **validity: datetime) -> x509.Certificate:
        """The attestation certificate of the key ``public_key`` (a 65-byte point)."""
        return certificate(
            "Android Keystore Key",
            point_key(public_key),
            self.intermediate_name,
            self.intermediate_key,
            ca=False,
            extensions=(x509.UnrecognizedExtension(KEY_DESCRIPTION_OID, description),),
            **validity,
        )

    def attest(
        self,
        challenge: bytes,
        public_key: bytes,
        *,
        include_root: bool = True,
        description: bytes | None = None,
        **fields: Any,
    ) -> AndroidKeyAttestation:
        """The chain ``KeyStore.getCertificateChain`` returns for a key made with
        ``setAttestationChallenge(challenge)``; ``fields`` change the KeyDescription."""
        leaf = self.leaf(public_key, description or key_description(challenge, **fields))
        chain = [der(leaf), der(self.intermediate)]
        if include_root:
            chain.append(der(self.root))
        return AndroidKeyAttestation(certificate_chain=chain)


# -- Apple -----------------------------------------------------------------------------

APP_ID = "TEAM123456.com.example.bank"


class AppAttestService(Authority):
    """Apple's role: credential certificates of App Attest keys."""

    def __init__(self) -> None:
        super().__init__("Test App Attestation Root", "Test App Attestation CA 1")

    def attest(
        self,
        challenge: bytes,
        public_key: bytes,
        *,
        app_id: str = APP_ID,
        environment: str = "production",
        counter: int = 0,
        client_data: bytes | None = None,
        key_id: bytes | None = None,
    ) -> AppleAppAttestation:
        """``attestKey`` with clientDataHash = SHA-256(challenge || public_key) (or of
        ``client_data``)."""
        app_key = ec.generate_private_key(ec.SECP256R1())
        point = app_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        true_key_id = hashlib.sha256(point).digest()
        numbers = app_key.public_key().public_numbers()
        cose_key = cbor2.dumps(
            {
                1: 2,
                3: -7,
                -1: 1,
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )
        auth_data = (
            hashlib.sha256(app_id.encode()).digest()
            + b"\x40"
            + counter.to_bytes(4, "big")
            + APPLE_AAGUIDS[environment]
            + len(true_key_id).to_bytes(2, "big")
            + true_key_id
            + cose_key
        )
        client_data_hash = hashlib.sha256(
            challenge + public_key if client_data is None else client_data
        ).digest()
        nonce = hashlib.sha256(auth_data + client_data_hash).digest()
        credential = certificate(
            true_key_id.hex(),
            app_key.public_key(),
            self.intermediate_name,
            self.intermediate_key,
            ca=False,
            extensions=(
                x509.UnrecognizedExtension(
                    APP_ATTEST_NONCE_OID, sequence(explicit(1, octets(nonce)))
                ),
            ),
        )
        statement = {
            "fmt": "apple-appattest",
            "attStmt": {"x5c": [der(credential), der(self.intermediate)], "receipt": b"receipt"},
            "authData": auth_data,
        }
        return AppleAppAttestation(
            key_id=key_id or true_key_id, attestation_object=cbor2.dumps(statement)
        )
