"""Where private keys live: a PKCS#11 token, or (explicitly chosen) encrypted files.

A key store knows objects, not policy: it generates, lists, destroys and signs with keys
named by ``(purpose, kid)``. Which key is active, rotation and JWKS are the
:class:`~hsm.keyring.Keyring`'s business, written once for both stores.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsm import ecdsa
from hsm.errors import HsmPermanentError, KeyNotFound
from hsm.pkcs11_token import Pkcs11Token, PooledSession, can_sign

log = logging.getLogger(__name__)

_ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))


class KeyStore(Protocol):
    """The operations a key backend offers the keyring. All are blocking and thread-safe."""

    name: str

    def generate(self, *, purpose: str, kid: str) -> ec.EllipticCurvePublicKey: ...

    def load(self) -> list[tuple[str, str, ec.EllipticCurvePublicKey]]:
        """Every ``(purpose, kid, public key)`` in the store."""
        ...

    def destroy(self, *, purpose: str, kid: str) -> None: ...

    def sign_digest(self, *, kid: str, digest: bytes) -> bytes:
        """Raw ``r || s`` ECDSA signature of a SHA-256 ``digest``."""
        ...

    def close(self) -> None: ...


def label_of(purpose: str, kid: str) -> str:
    """``CKA_LABEL`` of a key: its purpose and kid, for the humans reading ``pkcs11-tool -O``."""
    return f"{purpose}/{kid}"


class Pkcs11KeyStore:
    """Keys generated on a PKCS#11 token, never extractable."""

    name = "pkcs11"

    def __init__(self, token: Pkcs11Token) -> None:
        self.token = token

    def generate(self, *, purpose: str, kid: str) -> ec.EllipticCurvePublicKey:
        def generate(pooled: PooledSession) -> bytes:
            parameters = pooled.session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: ecdsa.P256_EC_PARAMS}, local=True
            )
            public, _ = parameters.generate_keypair(
                id=kid.encode(),
                label=label_of(purpose, kid),
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False},
                # Set every attribute explicitly: token defaults differ (SoftHSM2 leaves
                # SENSITIVE false, python-pkcs11 adds DERIVE). PSD2 RTS art. 22(2).
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.DERIVE: False,
                    Attribute.SIGN: True,
                    Attribute.MODIFIABLE: False,
                },
            )
            return _point_of(public)

        # Not retried: a retry after a lost session could leave two keys with one kid.
        return ecdsa.load_public_key(self.token.run(generate, retry=False))

    def load(self) -> list[tuple[str, str, ec.EllipticCurvePublicKey]]:
        def load(pooled: PooledSession) -> list[tuple[str, str, bytes]]:
            found = []
            for public in pooled.session.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC}
            ):
                purpose, _, kid = str(public[Attribute.LABEL]).partition("/")
                if kid and bytes(public[Attribute.ID]) == kid.encode():
                    found.append((purpose, kid, _point_of(public)))
            return found

        return [
            (purpose, kid, ecdsa.load_public_key(point))
            for purpose, kid, point in self.token.run(load)
        ]

    def destroy(self, *, purpose: str, kid: str) -> None:
        def destroy(pooled: PooledSession) -> None:
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for found in pooled.session.get_objects(
                    {Attribute.CLASS: object_class, Attribute.ID: kid.encode()}
                ):
                    found.destroy()

        self.token.run(destroy)
        self.token.forget_keys()

    def sign_digest(self, *, kid: str, digest: bytes) -> bytes:
        def sign(pooled: PooledSession) -> bytes:
            key = pooled.private_keys.get(kid)
            if key is None:
                key = pooled.private_keys[kid] = can_sign(
                    pooled.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=kid.encode())
                )
            # SoftHSM2 has no CKM_ECDSA_SHA256: the host hashes, the token signs the digest
            # with raw CKM_ECDSA, whose output is already r || s (PKCS#11 v2.40 §2.3.6).
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

        return self.token.run(sign)

    def private_key_attributes(self, kid: str) -> dict[str, bool]:
        """The security attributes of a private key as the token reports them (for audits)."""
        names = (
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.DERIVE,
            Attribute.SIGN,
            Attribute.LOCAL,
        )

        def read(pooled: PooledSession) -> dict[str, bool]:
            key = pooled.session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=kid.encode())
            return {name.name: bool(key[name]) for name in names}

        return self.token.run(read)

    def close(self) -> None:
        self.token.close()


def _point_of(public: pkcs11.Object) -> bytes:
    # CKA_EC_POINT is the DER OCTET STRING wrapping the X9.62 point (PKCS#11 v2.40 §2.3.3).
    encoded = bytes(public[Attribute.EC_POINT])
    if len(encoded) == ecdsa.POINT_LENGTH + 2 and encoded[:2] == b"\x04\x41":
        return encoded[2:]
    raise HsmPermanentError("the token returned an EC point that is not P-256")


class SoftwareKeyStore:
    """Private keys in files under a directory, each encrypted with the configured passphrase.

    For machines without any PKCS#11 module. The keys are as safe as the passphrase and the
    file permissions (0600 in a 0700 directory); this is not an HSM, and tapsign says so in
    its log every time it starts with this store.
    """

    name = "software"

    def __init__(self, directory: Path, passphrase: str) -> None:
        log.warning(
            "HSM backend 'software': private keys are files in %s, not in an HSM; "
            "use it only where no PKCS#11 module is available",
            directory,
        )
        self.directory = directory
        self._passphrase = passphrase.encode()
        self._lock = threading.Lock()
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, purpose: str, kid: str) -> Path:
        return self.directory / f"{purpose}__{kid}.pem"

    def generate(self, *, purpose: str, kid: str) -> ec.EllipticCurvePublicKey:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._passphrase),
        )
        path = self._path(purpose, kid)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        with self._lock:
            self._keys[kid] = key
        return key.public_key()

    def load(self) -> list[tuple[str, str, ec.EllipticCurvePublicKey]]:
        found = []
        for path in sorted(self.directory.glob("*__*.pem")):
            purpose, _, kid = path.stem.partition("__")
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), self._passphrase)
            except (ValueError, TypeError) as exc:
                raise HsmPermanentError(
                    f"cannot decrypt the software key {path.name}: wrong passphrase?"
                ) from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise HsmPermanentError(f"the software key {path.name} is not an EC key")
            with self._lock:
                self._keys[kid] = key
            found.append((purpose, kid, key.public_key()))
        return found

    def destroy(self, *, purpose: str, kid: str) -> None:
        self._path(purpose, kid).unlink(missing_ok=True)
        with self._lock:
            self._keys.pop(kid, None)

    def sign_digest(self, *, kid: str, digest: bytes) -> bytes:
        key = self._keys.get(kid)
        if key is None:
            raise KeyNotFound("no such software key")
        r, s = utils.decode_dss_signature(key.sign(digest, _ECDSA_PREHASHED))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def close(self) -> None:
        with self._lock:
            self._keys.clear()
