"""Where tapsign's keys live: a PKCS#11 token, or (explicitly chosen) encrypted files.

A key store knows objects, not policy: it generates, lists, destroys and uses keys named by
``(purpose, kid)``. Two kinds exist: ``signing`` keys (ECDSA P-256, ES256) and
``encryption`` keys (AES-256-GCM, for data tapsign must keep but must not store in clear,
such as post-operation contexts). Which key is active, rotation and the JWKS are the
:class:`~hsm.keyring.Keyring`'s business, written once for both stores.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

import pkcs11
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass, exceptions
from pkcs11.mechanisms import GCMParams

from hsm import ecdsa
from hsm.errors import DecryptionFailed, HsmPermanentError, KeyNotFound
from hsm.pkcs11_token import (
    Pkcs11Token,
    PooledSession,
    can_decrypt,
    can_encrypt,
    can_sign,
)

log = logging.getLogger(__name__)

KeyKind = Literal["signing", "encryption"]
#: ``(purpose, kid, public key)``; encryption keys have no public key.
StoredKey = tuple[str, str, ec.EllipticCurvePublicKey | None]

_ECDSA_PREHASHED = ec.ECDSA(utils.Prehashed(hashes.SHA256()))
GCM_TAG_BITS = 128

# Set every attribute explicitly: token defaults differ (SoftHSM2 leaves SENSITIVE false,
# python-pkcs11 adds DERIVE). PSD2 RTS art. 22(2)(b)-(c); checklist item 17.
_SECRET_ATTRIBUTES = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.DERIVE: False,
    Attribute.MODIFIABLE: False,
}


class KeyStore(Protocol):
    """The operations a key backend offers the keyring. All are blocking and thread-safe."""

    name: str

    def generate(self, *, purpose: str, kid: str, kind: KeyKind) -> None: ...

    def load(self) -> list[StoredKey]:
        """Every key in the store."""
        ...

    def destroy(self, *, purpose: str, kid: str) -> None: ...

    def sign_digest(self, *, kid: str, digest: bytes) -> bytes:
        """Raw ``r || s`` ECDSA signature of a SHA-256 ``digest``."""
        ...

    def encrypt(self, *, kid: str, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-256-GCM ciphertext followed by its 16-byte tag."""
        ...

    def decrypt(self, *, kid: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """The plaintext, or :class:`~hsm.errors.DecryptionFailed` if anything was altered."""
        ...

    def close(self) -> None: ...


def label_of(purpose: str, kid: str) -> str:
    """``CKA_LABEL`` of a key: its purpose and kid, for the humans reading ``pkcs11-tool -O``."""
    return f"{purpose}/{kid}"


class Pkcs11KeyStore:
    """Keys generated on a PKCS#11 token, never extractable.

    ``lock`` is a file through which the processes of this host (the server's workers, and
    ``tapsign hsm rotate`` or ``retire``) take turns at the token's key list: generating or
    destroying a key holds it exclusively, listing the keys shares it. SoftHSM2 2.6 needs
    it: a process that lists the keys while another generates one can write its partial
    copy of the new key back over it (the key loses its label and is never seen again), and
    a key pair's public half is listed before its private half exists
    (docs/how-to/hsm.md). A network HSM serialises this itself; the lock costs nothing.
    """

    name = "pkcs11"

    def __init__(self, token: Pkcs11Token, *, lock: Path | None = None) -> None:
        self.token = token
        self._lock = lock

    @contextlib.contextmanager
    def _key_list(self, *, changing: bool) -> Iterator[None]:
        if self._lock is None:
            yield
            return
        descriptor = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX if changing else fcntl.LOCK_SH)
            yield
        finally:
            os.close(descriptor)

    def generate(self, *, purpose: str, kid: str, kind: KeyKind) -> None:
        def generate(pooled: PooledSession) -> None:
            if kind == "encryption":
                pooled.session.generate_key(
                    KeyType.AES,
                    256,
                    id=kid.encode(),
                    label=label_of(purpose, kid),
                    store=True,
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={**_SECRET_ATTRIBUTES, Attribute.WRAP: False, Attribute.UNWRAP: False},
                )
                return
            parameters = pooled.session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: ecdsa.P256_EC_PARAMS}, local=True
            )
            parameters.generate_keypair(
                id=kid.encode(),
                label=label_of(purpose, kid),
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False},
                private_template={**_SECRET_ATTRIBUTES, Attribute.SIGN: True},
            )

        # Not retried: a retry after a lost session could leave two keys with one kid.
        with self._key_list(changing=True):
            self.token.run(generate, retry=False)

    def load(self) -> list[StoredKey]:
        def load(pooled: PooledSession) -> list[tuple[str, str, bytes | None]]:
            found: list[tuple[str, str, bytes | None]] = []
            for template in (
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC},
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES},
            ):
                for stored in pooled.session.get_objects(template):
                    purpose, _, kid = str(stored[Attribute.LABEL]).partition("/")
                    if kid and bytes(stored[Attribute.ID]) == kid.encode():
                        public = template[Attribute.CLASS] is ObjectClass.PUBLIC_KEY
                        found.append((purpose, kid, _point_of(stored) if public else None))
            return found

        with self._key_list(changing=False):
            listed = self.token.run(load)
        return [
            (purpose, kid, None if point is None else ecdsa.load_public_key(point))
            for purpose, kid, point in listed
        ]

    def destroy(self, *, purpose: str, kid: str) -> None:
        def destroy(pooled: PooledSession) -> None:
            for object_class in (
                ObjectClass.PRIVATE_KEY,
                ObjectClass.PUBLIC_KEY,
                ObjectClass.SECRET_KEY,
            ):
                for found in pooled.session.get_objects(
                    {Attribute.CLASS: object_class, Attribute.ID: kid.encode()}
                ):
                    found.destroy()

        with self._key_list(changing=True):
            self.token.run(destroy)
        self.token.forget_keys()

    def sign_digest(self, *, kid: str, digest: bytes) -> bytes:
        def sign(pooled: PooledSession) -> bytes:
            key = can_sign(_handle(pooled, ObjectClass.PRIVATE_KEY, kid))
            # SoftHSM2 has no CKM_ECDSA_SHA256: the host hashes, the token signs the digest
            # with raw CKM_ECDSA, whose output is already r || s (PKCS#11 v2.40 §2.3.6).
            return bytes(key.sign(digest, mechanism=Mechanism.ECDSA))

        return self.token.run(sign)

    def encrypt(self, *, kid: str, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        def encrypt(pooled: PooledSession) -> bytes:
            key = can_encrypt(_handle(pooled, ObjectClass.SECRET_KEY, kid))
            parameters = GCMParams(nonce, aad, GCM_TAG_BITS)
            return _whole(
                key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=parameters)
            )

        return self.token.run(encrypt)

    def decrypt(self, *, kid: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        def decrypt(pooled: PooledSession) -> bytes:
            key = can_decrypt(_handle(pooled, ObjectClass.SECRET_KEY, kid))
            parameters = GCMParams(nonce, aad, GCM_TAG_BITS)
            try:
                return _whole(
                    key.decrypt(ciphertext, mechanism=Mechanism.AES_GCM, mechanism_param=parameters)
                )
            except (
                exceptions.EncryptedDataInvalid,
                exceptions.EncryptedDataLenRange,
                exceptions.GeneralError,  # SoftHSM2's answer to a wrong GCM tag
            ) as exc:
                raise DecryptionFailed("the encrypted data was altered or is not ours") from exc

        return self.token.run(decrypt)

    def private_key_attributes(self, kid: str) -> dict[str, bool]:
        """Security attributes of a private or secret key as the token reports them (audits)."""
        names = (
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.DERIVE,
            Attribute.LOCAL,
        )

        def read(pooled: PooledSession) -> dict[str, bool]:
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY):
                for key in pooled.session.get_objects(
                    {Attribute.CLASS: object_class, Attribute.ID: kid.encode()}
                ):
                    return {name.name: bool(key[name]) for name in names}
            raise KeyNotFound("no such key on the HSM token")

        return self.token.run(read)

    def close(self) -> None:
        self.token.close()


def _handle(pooled: PooledSession, object_class: ObjectClass, kid: str) -> pkcs11.Object:
    """The key object ``kid`` of this session, found once and then remembered."""
    handle = pooled.key_handles.get(kid)
    if handle is None:
        handle = pooled.key_handles[kid] = pooled.session.get_key(
            object_class=object_class, id=kid.encode()
        )
    return handle


def _whole(result: bytes | Iterator[bytes]) -> bytes:
    # python-pkcs11 returns an iterator only for iterator input, which tapsign never passes.
    if not isinstance(result, bytes):
        raise HsmPermanentError("the HSM returned a stream where one value was expected")
    return result


def _point_of(public: pkcs11.Object) -> bytes:
    # CKA_EC_POINT is the DER OCTET STRING wrapping the X9.62 point (PKCS#11 v2.40 §2.3.3).
    encoded = bytes(public[Attribute.EC_POINT])
    if len(encoded) == ecdsa.POINT_LENGTH + 2 and encoded[:2] == b"\x04\x41":
        return encoded[2:]
    raise HsmPermanentError("the token returned an EC point that is not P-256")


class SoftwareKeyStore:
    """Keys in files under a directory, protected by the configured passphrase.

    Signing keys are PKCS#8 files encrypted with the passphrase; an encryption key is a
    random salt from which scrypt derives the AES key with the passphrase, so no key
    material is on disk in clear. For machines without any PKCS#11 module: the keys are as
    safe as the passphrase and the file permissions (0600 in a 0700 directory). This is not
    an HSM, and tapsign says so in its log every time it starts with this store.
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
        self._signing: dict[str, ec.EllipticCurvePrivateKey] = {}
        self._encryption: dict[str, AESGCM] = {}
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, purpose: str, kid: str, kind: KeyKind) -> Path:
        return self.directory / f"{purpose}__{kid}.{'pem' if kind == 'signing' else 'salt'}"

    def _aes(self, salt: bytes) -> AESGCM:
        return AESGCM(Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(self._passphrase))

    def generate(self, *, purpose: str, kid: str, kind: KeyKind) -> None:
        if kind == "signing":
            key = ec.generate_private_key(ec.SECP256R1())
            content = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(self._passphrase),
            )
        else:
            content = os.urandom(16)
        descriptor = os.open(
            self._path(purpose, kid, kind), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
        with self._lock:
            if kind == "signing":
                self._signing[kid] = key
            else:
                self._encryption[kid] = self._aes(content)

    def load(self) -> list[StoredKey]:
        found: list[StoredKey] = []
        for path in sorted(self.directory.glob("*__*.*")):
            purpose, _, kid = path.stem.partition("__")
            if path.suffix == ".salt":
                with self._lock:
                    self._encryption[kid] = self._aes(path.read_bytes())
                found.append((purpose, kid, None))
                continue
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), self._passphrase)
            except (ValueError, TypeError) as exc:
                raise HsmPermanentError(
                    f"cannot decrypt the software key {path.name}: wrong passphrase?"
                ) from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise HsmPermanentError(f"the software key {path.name} is not an EC key")
            with self._lock:
                self._signing[kid] = key
            found.append((purpose, kid, key.public_key()))
        return found

    def destroy(self, *, purpose: str, kid: str) -> None:
        for kind in ("signing", "encryption"):
            self._path(purpose, kid, kind).unlink(missing_ok=True)
        with self._lock:
            self._signing.pop(kid, None)
            self._encryption.pop(kid, None)

    def sign_digest(self, *, kid: str, digest: bytes) -> bytes:
        key = self._signing.get(kid)
        if key is None:
            raise KeyNotFound("no such software key")
        r, s = utils.decode_dss_signature(key.sign(digest, _ECDSA_PREHASHED))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def encrypt(self, *, kid: str, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._cipher(kid).encrypt(nonce, plaintext, aad)

    def decrypt(self, *, kid: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._cipher(kid).decrypt(nonce, ciphertext, aad)
        except InvalidTag as exc:
            raise DecryptionFailed("the encrypted data was altered or is not ours") from exc

    def _cipher(self, kid: str) -> AESGCM:
        cipher = self._encryption.get(kid)
        if cipher is None:
            raise KeyNotFound("no such software key")
        return cipher

    def close(self) -> None:
        with self._lock:
            self._signing.clear()
            self._encryption.clear()
