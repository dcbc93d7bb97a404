"""Device-key attestation at enrolment: Android key attestation and Apple App Attest.

A registration proves possession of the new key by signing with it; an attestation also
proves *where* the key lives (PSD2 RTS arts. 7, 9(3), 24(2)(b)):

* **Android key attestation** (``android-key``): the phone generates its P-256 key in the
  Keystore with ``setAttestationChallenge(challenge)`` and sends the key's certificate
  chain. The chain must end at a configured root (Google's by default), no certificate may
  be revoked in the configured status list, the leaf must certify the enrolled key, and its
  KeyDescription extension (OID 1.3.6.1.4.1.11129.2.1.17) must carry the transaction's
  challenge, a TEE or StrongBox security level, a key generated inside (not imported) for
  signing with EC P-256, and - unless switched off - a locked bootloader with verified boot.
* **Apple App Attest** (``apple-appattest``): iOS cannot attest a Secure Enclave key used
  for plain signatures, so the app attests itself instead and binds the registration to the
  attestation: ``clientDataHash`` = SHA-256(challenge || the new 65-byte public key). The
  credential certificate must chain to Apple's App Attestation root, carry the nonce
  SHA-256(authData || clientDataHash), and hash to ``keyId``; ``authData`` must name a
  configured App ID, have counter 0 and the configured environment's AAGUID.

:meth:`Attestor.check` returns what was attested (``android-key/strongbox``,
``android-key/trusted-environment``, ``apple-appattest``) or raises
:class:`AttestationRefused` with the specific reason, which goes to the audit trail only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.settings import AttestationSettings
from tapsign_sdk.model import (
    MAX_CERTIFICATE_CHAIN,
    AndroidKeyAttestation,
    AppleAppAttestation,
    Attestation,
)
from tapsign_sdk.problems import ConfigurationError

log = logging.getLogger(__name__)

KEY_DESCRIPTION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.11129.2.1.17")
APP_ATTEST_NONCE_OID = x509.ObjectIdentifier("1.2.840.113635.100.8.2")

#: A phone's clock may run ahead of ours: its new leaf certificate's notBefore may be this
#: far in our future.
CLOCK_SKEW = timedelta(minutes=5)
SECURITY_LEVELS = {1: "trusted-environment", 2: "strongbox"}
_MIN_LEVEL = {"trusted-environment": 1, "strongbox": 2}
APPLE_AAGUIDS = {
    "production": b"appattest" + bytes(7),
    "development": b"appattestdevelop",
}

# KeyMint AuthorizationList tags (context-specific numbers) and values used here.
_PURPOSE, _ALGORITHM, _EC_CURVE = 1, 2, 10
_ORIGIN, _ROOT_OF_TRUST, _APPLICATION_ID = 702, 704, 709
_PURPOSE_SIGN, _ALGORITHM_EC, _CURVE_P256, _ORIGIN_GENERATED = 2, 3, 1, 0
_BOOT_VERIFIED = 0


class AttestationRefused(Exception):
    """The attestation does not hold; the message is for the audit trail, not the phone."""


# -- DER, as much as the attestation extensions need ------------------------------------


@dataclass(frozen=True, slots=True)
class Tlv:
    tag_class: int  # 0 universal, 2 context-specific
    constructed: bool
    number: int
    value: bytes


def der_items(data: bytes) -> Iterator[Tlv]:
    """The DER elements that ``data`` holds one after the other (definite lengths only)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 2:
            raise AttestationRefused("truncated DER element")
        first = data[offset]
        offset += 1
        number = first & 0x1F
        if number == 0x1F:  # high tag number: base-128 digits
            number = 0
            while True:
                if offset >= len(data) or number > 1 << 24:
                    raise AttestationRefused("bad DER tag")
                byte = data[offset]
                offset += 1
                number = number << 7 | byte & 0x7F
                if not byte & 0x80:
                    break
        if offset >= len(data):
            raise AttestationRefused("truncated DER element")
        length = data[offset]
        offset += 1
        if length & 0x80:
            size = length & 0x7F
            if not 0 < size <= 4 or offset + size > len(data):
                raise AttestationRefused("bad DER length")
            length = int.from_bytes(data[offset : offset + size], "big")
            offset += size
        if offset + length > len(data):
            raise AttestationRefused("truncated DER element")
        yield Tlv(first >> 6, bool(first & 0x20), number, data[offset : offset + length])
        offset += length


def _sequence(data: bytes, what: str) -> list[Tlv]:
    items = list(der_items(data))
    if len(items) != 1 or items[0].tag_class != 0 or items[0].number != 0x10:
        raise AttestationRefused(f"{what} is not a DER SEQUENCE")
    return list(der_items(items[0].value))


def _integer(item: Tlv, what: str) -> int:
    if item.tag_class != 0 or item.number not in (0x02, 0x0A) or not item.value:
        raise AttestationRefused(f"{what} is not an INTEGER")
    return int.from_bytes(item.value, "big", signed=True)


def _octets(item: Tlv, what: str) -> bytes:
    if item.tag_class != 0 or item.number != 0x04:
        raise AttestationRefused(f"{what} is not an OCTET STRING")
    return item.value


def _tagged(items: Sequence[Tlv]) -> dict[int, Tlv]:
    """An AuthorizationList: ``{tag: the explicitly tagged inner element}``."""
    fields = {}
    for item in items:
        if item.tag_class != 2:
            raise AttestationRefused("AuthorizationList holds an untagged element")
        inner = list(der_items(item.value))
        if len(inner) != 1:
            raise AttestationRefused(f"AuthorizationList tag {item.number} is malformed")
        fields[item.number] = inner[0]
    return fields


# -- trust anchors and revocation ------------------------------------------------------


def load_roots(path: str | None, shipped: str) -> list[x509.Certificate]:
    """The PEM certificates of ``path``, or of engine/attestation_roots/``shipped``."""
    try:
        data = (
            Path(path).read_bytes()
            if path is not None
            else resources.files("engine").joinpath("attestation_roots", shipped).read_bytes()
        )
        roots = x509.load_pem_x509_certificates(data)
    except OSError as exc:
        raise ConfigurationError(f"cannot read attestation roots {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigurationError(f"attestation roots {path or shipped} are not PEM") from exc
    return roots


class RevocationList:
    """Google's attestation status list (``{"entries": {serial-hex: {"status": …}}}``),
    read again whenever the file changes; the operator refreshes the file."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._revoked: dict[str, str] = {}
        if path is not None:
            self._revoked = self._read()

    def _read(self) -> dict[str, str]:
        assert self.path is not None  # noqa: S101 - only called with a path
        try:
            stat = os.stat(self.path)
            entries = json.loads(Path(self.path).read_bytes())["entries"]
            revoked = {
                serial.lower().lstrip("0"): str(entry.get("status", "REVOKED"))
                for serial, entry in entries.items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(
                f"cannot read the attestation status list {self.path}: {exc}"
            ) from exc
        self._stamp = (stat.st_mtime_ns, stat.st_size)
        return revoked

    def status(self, serial: int) -> str | None:
        """REVOKED or SUSPENDED for a listed serial number, None otherwise."""
        if self.path is None:
            return None
        try:
            stat = os.stat(self.path)
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._revoked = self._read()
        except (OSError, ConfigurationError):
            # A list being replaced or gone: keep the last one read, and say so.
            log.warning("attestation status list %s unreadable; using the last one", self.path)
        return self._revoked.get(format(serial, "x"))


# -- the checks -----------------------------------------------------------------------


def _point(key: Any) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise AttestationRefused("the attested key is not a P-256 key")
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def verify_chain(
    chain: Sequence[bytes],
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
    revocations: RevocationList | None = None,
) -> list[x509.Certificate]:
    """The parsed chain, leaf first, each certificate issued by the next (a CA) and the last
    by one of ``roots`` (a root sent along is accepted and dropped); valid at ``now``, none
    listed as revoked."""
    if not 0 < len(chain) <= MAX_CERTIFICATE_CHAIN:
        raise AttestationRefused(f"a chain has 1 to {MAX_CERTIFICATE_CHAIN} certificates")
    try:
        certificates = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        raise AttestationRefused(f"a certificate of the chain does not parse: {exc}") from exc
    root_keys = {
        root.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        for root in roots
    }
    last = certificates[-1]
    last_key = last.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if len(certificates) > 1 and last.issuer == last.subject and last_key in root_keys:
        certificates.pop()  # the root itself (any of its certificates): the anchor decides
    for certificate, issuer in itertools.pairwise(certificates):
        _issued_by(certificate, issuer)
        try:
            is_ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise AttestationRefused(f"certificate {issuer.serial_number:x} is not a CA")
    anchored = False
    for root in roots:
        try:
            _issued_by(certificates[-1], root)
        except AttestationRefused:
            continue
        anchored = True
        break
    if not anchored:
        raise AttestationRefused("the chain does not end at a trusted root")
    for certificate in certificates:
        if (
            not certificate.not_valid_before_utc - CLOCK_SKEW
            <= now
            <= (certificate.not_valid_after_utc)
        ):
            raise AttestationRefused(
                f"certificate {certificate.serial_number:x} is not valid at {now.isoformat()}"
            )
        status = revocations.status(certificate.serial_number) if revocations else None
        if status is not None:
            raise AttestationRefused(f"certificate {certificate.serial_number:x} is {status}")
    return certificates


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> None:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AttestationRefused(
            f"certificate {certificate.serial_number:x} is not issued by {issuer.subject}"
        ) from exc


def _extension(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        extension = certificate.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except ValueError as exc:
        raise AttestationRefused(f"certificate extensions do not parse: {exc}") from exc
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise AttestationRefused(f"extension {oid.dotted_string} is not the expected kind")
    return value.value


class Attestor:
    """Checks attestations under the ``[attestation]`` settings."""

    def __init__(self, settings: AttestationSettings) -> None:
        self.settings = settings
        self.required = settings.policy == "required"
        self.android_roots = load_roots(settings.android_roots, "google.pem")
        self.apple_roots = load_roots(settings.apple_root, "apple.pem")
        self.revocations = RevocationList(settings.android_revocation_list)
        self._packages = frozenset(settings.android_packages)
        self._digests = frozenset(bytes.fromhex(d) for d in settings.android_signing_digests)
        self._app_ids = {hashlib.sha256(app.encode()).digest() for app in settings.apple_app_ids}

    def check(
        self, attestation: Attestation, *, challenge: bytes, public_key: bytes, now: datetime
    ) -> str:
        """What the attestation proves about ``public_key`` (the new 65-byte point)."""
        try:
            if isinstance(attestation, AndroidKeyAttestation):
                return self._android(
                    attestation, challenge=challenge, public_key=public_key, now=now
                )
            return self._apple(attestation, challenge=challenge, public_key=public_key, now=now)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            # Parsers of certificates and keys refusing what they were given.
            raise AttestationRefused(f"the attestation does not parse: {exc}") from exc

    def _android(
        self,
        attestation: AndroidKeyAttestation,
        *,
        challenge: bytes,
        public_key: bytes,
        now: datetime,
    ) -> str:
        chain = verify_chain(
            attestation.certificate_chain,
            self.android_roots,
            now=now,
            revocations=self.revocations,
        )
        leaf = chain[0]
        if _point(leaf.public_key()) != public_key:
            raise AttestationRefused("the leaf certificate does not certify the enrolled key")
        if any(_extension(c, KEY_DESCRIPTION_OID) is not None for c in chain[1:]):
            raise AttestationRefused("a CA certificate carries a key description")
        extension = _extension(leaf, KEY_DESCRIPTION_OID)
        if extension is None:
            raise AttestationRefused("the leaf certificate has no key description")
        fields = _sequence(extension, "KeyDescription")
        if len(fields) < 8:
            raise AttestationRefused("KeyDescription is too short")
        attestation_level = _integer(fields[1], "attestationSecurityLevel")
        keymint_level = _integer(fields[3], "keyMintSecurityLevel")
        level = min(attestation_level, keymint_level)
        # Software (0), or a value no KeyMint writes, is never enough.
        if (
            level not in SECURITY_LEVELS
            or level < _MIN_LEVEL[self.settings.android_min_security_level]
        ):
            raise AttestationRefused(
                f"security level {attestation_level}/{keymint_level} is below "
                f"{self.settings.android_min_security_level}"
            )
        if _octets(fields[4], "attestationChallenge") != challenge:
            raise AttestationRefused("the attestation challenge is not the transaction's")
        software = _tagged(list(der_items(_sequence_value(fields[6], "softwareEnforced"))))
        hardware = _tagged(list(der_items(_sequence_value(fields[7], "hardwareEnforced"))))
        self._android_key(hardware)
        if self.settings.android_verified_boot:
            _verified_boot(hardware)
        if self._packages or self._digests:
            self._android_app(hardware.get(_APPLICATION_ID) or software.get(_APPLICATION_ID))
        return f"android-key/{SECURITY_LEVELS[level]}"

    @staticmethod
    def _android_key(hardware: dict[int, Tlv]) -> None:
        purposes = hardware.get(_PURPOSE)
        if purposes is None or _PURPOSE_SIGN not in {
            _integer(item, "purpose") for item in der_items(purposes.value)
        }:
            raise AttestationRefused("the key is not a hardware-enforced signing key")
        if _ALGORITHM not in hardware or _integer(hardware[_ALGORITHM], "algorithm") != (
            _ALGORITHM_EC
        ):
            raise AttestationRefused("the key is not a hardware-enforced EC key")
        if _EC_CURVE not in hardware or _integer(hardware[_EC_CURVE], "ecCurve") != _CURVE_P256:
            raise AttestationRefused("the key is not on P-256")
        if _ORIGIN not in hardware or _integer(hardware[_ORIGIN], "origin") != _ORIGIN_GENERATED:
            raise AttestationRefused("the key was not generated in the secure hardware")

    def _android_app(self, application: Tlv | None) -> None:
        if application is None:
            raise AttestationRefused("the attestation names no application")
        identity = _sequence(_octets(application, "attestationApplicationId"), "app")
        if len(identity) < 2:
            raise AttestationRefused("attestationApplicationId is too short")
        packages, digests = identity[:2]
        names = set()
        for info in der_items(packages.value):
            name = list(der_items(info.value))[:1]
            if name:
                names.add(_octets(name[0], "package name").decode(errors="replace"))
        if self._packages and not names & self._packages:
            raise AttestationRefused(f"application {sorted(names)} is not allowed")
        signers = {_octets(item, "signature digest") for item in der_items(digests.value)}
        if self._digests and not signers & self._digests:
            raise AttestationRefused("the application's signing certificate is not allowed")

    def _apple(
        self,
        attestation: AppleAppAttestation,
        *,
        challenge: bytes,
        public_key: bytes,
        now: datetime,
    ) -> str:
        if not self._app_ids:
            raise AttestationRefused("no App ID is configured for App Attest")
        try:
            statement = cbor2.loads(attestation.attestation_object)
            fmt = statement["fmt"]
            chain = statement["attStmt"]["x5c"]
            auth_data = statement["authData"]
        except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError) as exc:
            raise AttestationRefused(f"the attestation object does not parse: {exc}") from exc
        if fmt != "apple-appattest" or not isinstance(auth_data, bytes):
            raise AttestationRefused("the attestation object is not an App Attest statement")
        if not isinstance(chain, list) or not all(isinstance(c, bytes) for c in chain):
            raise AttestationRefused("x5c is not a list of certificates")
        certificates = verify_chain(chain, self.apple_roots, now=now)
        credential = certificates[0]
        client_data_hash = hashlib.sha256(challenge + public_key).digest()
        nonce = hashlib.sha256(auth_data + client_data_hash).digest()
        extension = _extension(credential, APP_ATTEST_NONCE_OID)
        if extension is None:
            raise AttestationRefused("the credential certificate has no nonce")
        tagged = _sequence(extension, "App Attest nonce")
        if (
            len(tagged) != 1
            or (tagged[0].tag_class, tagged[0].number) != (2, 1)
            or _octets(_only(tagged[0].value), "nonce") != nonce
        ):
            raise AttestationRefused("the nonce does not bind this challenge and key")
        key_id = hashlib.sha256(_point(credential.public_key())).digest()
        if key_id != attestation.key_id:
            raise AttestationRefused("keyId is not the credential certificate's key")
        if len(auth_data) < 55:
            raise AttestationRefused("authData is too short")
        rp_id_hash, counter = auth_data[:32], int.from_bytes(auth_data[33:37], "big")
        aaguid, id_length = auth_data[37:53], int.from_bytes(auth_data[53:55], "big")
        if rp_id_hash not in self._app_ids:
            raise AttestationRefused("the App ID is not allowed")
        if counter != 0:
            raise AttestationRefused(f"the attestation counter is {counter}, not 0")
        if aaguid != APPLE_AAGUIDS[self.settings.apple_environment]:
            environment = self.settings.apple_environment
            raise AttestationRefused(f"aaguid {aaguid!r} is not the {environment} one")
        if auth_data[55 : 55 + id_length] != key_id:
            raise AttestationRefused("the credential id is not keyId")
        return "apple-appattest"


def _sequence_value(item: Tlv, what: str) -> bytes:
    if item.tag_class != 0 or item.number != 0x10:
        raise AttestationRefused(f"{what} is not a SEQUENCE")
    return item.value


def _only(data: bytes) -> Tlv:
    items = list(der_items(data))
    if len(items) != 1:
        raise AttestationRefused("expected one DER element")
    return items[0]


def _verified_boot(hardware: dict[int, Tlv]) -> None:
    root = hardware.get(_ROOT_OF_TRUST)
    if root is None:
        raise AttestationRefused("the attestation has no root of trust")
    fields = list(der_items(_sequence_value(root, "rootOfTrust")))
    if len(fields) < 3:
        raise AttestationRefused("rootOfTrust is too short")
    locked = fields[1].tag_class == 0 and fields[1].number == 0x01 and fields[1].value == b"\xff"
    state = _integer(fields[2], "verifiedBootState")
    if not locked or state != _BOOT_VERIFIED:
        raise AttestationRefused(
            f"the device is not in verified boot (locked {locked}, state {state})"
        )
