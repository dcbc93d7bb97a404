"""tapsign's own keys: one active key per purpose, older ones kept for verification.

Lifecycle (RFC 7517 §4.5 key rollover; DORA RTS (EU) 2024/1774 art. 7 key policy):

* ``ensure`` creates the first key of each purpose that has none (``tapsign hsm init``);
* ``rotate`` creates a new key, which becomes the active one at once; the previous keys
  stay published in the JWKS so that what they signed still verifies;
* ``retire`` destroys a key that is no longer active, on the token and from the JWKS.

The active key of a purpose is its newest one. A kid starts with its creation time in
UTC to the microsecond, so "newest" is the greatest kid and the creation time is read
from the kid rather than kept beside it.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from hsm.errors import DecryptionFailed, KeyNotFound, KeyringError
from hsm.keystores import KeyKind, KeyStore, Pkcs11KeyStore, SoftwareKeyStore
from hsm.pkcs11_token import Pkcs11Token
from hsm.settings import HsmSettings

KID_TIME_FORMAT = "%Y%m%dT%H%M%S%f"
T = TypeVar("T")
NONCE_LENGTH = 12


class KeyPurpose(StrEnum):
    """What a key signs. Keys are never shared between purposes (key separation)."""

    #: Status, intent and result tokens tapsign issues and later checks itself.
    TOKEN = "token-signing"  # noqa: S105 - a purpose name, not a secret
    #: Consent JWTs, evidence that anyone verifies offline from the JWKS.
    CONSENT = "consent-signing"
    #: Callbacks to relying parties (JWS), verified by them from the JWKS.
    CALLBACK = "callback-signing"
    #: AES-256-GCM for data kept but never stored in clear (post-operation contexts).
    DATA = "data-encryption"

    @property
    def kind(self) -> KeyKind:
        return "encryption" if self is KeyPurpose.DATA else "signing"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    purpose: KeyPurpose
    kid: str
    #: None for an encryption key.
    public_key: ec.EllipticCurvePublicKey | None
    active: bool

    @property
    def created(self) -> datetime:
        return datetime.strptime(self.kid.partition("-")[0], KID_TIME_FORMAT).replace(tzinfo=UTC)

    def jwk(self) -> dict[str, Any]:
        """The public JWK (RFC 7517 §4, RFC 7518 §6.2) with its kid, use and alg."""
        if self.public_key is None:
            raise KeyNotFound(f"{self.kid} is an encryption key and has no public JWK")
        jwk = ECAlgorithm.to_jwk(self.public_key, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}


def new_kid(now: datetime) -> str:
    return f"{now.astimezone(UTC).strftime(KID_TIME_FORMAT)}-{secrets.token_hex(4)}"


class Keyring:
    """Key lifecycle and signing over a :class:`~hsm.keystores.KeyStore`. Thread-safe."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._keys: tuple[KeyInfo, ...] = ()
        self.refresh()

    @property
    def backend(self) -> str:
        return self._store.name

    @property
    def store(self) -> KeyStore:
        return self._store

    def refresh(self) -> None:
        """Read the key list from the store again: a running server does so every few
        seconds, so that a rotation or retirement by another process (``tapsign hsm rotate``,
        ``retire``) is taken up without a restart (engine/service.py)."""
        known = {purpose.value: purpose for purpose in KeyPurpose}
        loaded = sorted(
            (
                (known[purpose], kid, public_key)
                for purpose, kid, public_key in self._store.load()
                if purpose in known
            ),
            key=lambda entry: (entry[0].value, entry[1]),
            reverse=True,
        )
        keys = []
        for index, (purpose, kid, public_key) in enumerate(loaded):
            active = index == 0 or loaded[index - 1][0] is not purpose
            keys.append(KeyInfo(purpose, kid, public_key, active))
        self._keys = tuple(keys)

    def published(self, purpose: KeyPurpose | None = None) -> list[KeyInfo]:
        """Published keys, by purpose, newest first."""
        return [key for key in self._keys if purpose is None or key.purpose is purpose]

    def active(self, purpose: KeyPurpose) -> KeyInfo:
        for key in self._keys:
            if key.purpose is purpose:
                return key
        raise KeyNotFound(f"no {purpose.value} key: run 'tapsign hsm init'")

    def key(self, kid: str) -> KeyInfo:
        for key in self._keys:
            if key.kid == kid:
                return key
        raise KeyNotFound("no key with that kid")

    def ensure(self) -> list[KeyInfo]:
        """Create a key for every purpose that has none; return the keys created."""
        with self._lock:
            present = {key.purpose for key in self._keys}
            missing = [purpose for purpose in KeyPurpose if purpose not in present]
            for purpose in missing:
                self._store.generate(
                    purpose=purpose.value, kid=new_kid(datetime.now(UTC)), kind=purpose.kind
                )
            self.refresh()
        return [self.active(purpose) for purpose in missing]

    def rotate(self, purpose: KeyPurpose) -> KeyInfo:
        """Create a new key for ``purpose``; it is active from now on."""
        with self._lock:
            created = datetime.now(UTC)
            # Keep "greatest kid is newest" even if the clock stepped back since the last key.
            newest = next((key for key in self._keys if key.purpose is purpose), None)
            if newest is not None:
                created = max(created, newest.created + timedelta(microseconds=1))
            kid = new_kid(created)
            self._store.generate(purpose=purpose.value, kid=kid, kind=purpose.kind)
            self.refresh()
            active = self.active(purpose)
        if active.kid != kid:
            raise KeyringError(
                f"the new {purpose.value} key {kid} is not on the token after its generation; "
                f"{active.kid} stays active"
            )
        return active

    def retire(self, kid: str) -> KeyInfo:
        """Destroy a key that is no longer active. The active key cannot be retired."""
        with self._lock:
            key = self.key(kid)
            if key.active:
                raise KeyringError(
                    f"{kid} is the active {key.purpose.value} key: rotate first, then retire it"
                )
            self._store.destroy(purpose=key.purpose.value, kid=key.kid)
            self.refresh()
        return key

    def sign(self, kid: str, message: bytes) -> bytes:
        """ES256 signature (raw ``r || s``) of ``message`` with the published key ``kid``."""
        key = self.key(kid)
        return self._store.sign_digest(kid=key.kid, digest=hashlib.sha256(message).digest())

    def with_active(self, purpose: KeyPurpose, use: Callable[[KeyInfo], T]) -> T:
        """``use(the active key of purpose)``. Should that key be gone from the token
        (another process rotated, then retired it, since this keyring last read the list),
        the list is read again and ``use`` gets the new active key: signing follows a
        retirement at once, not at the next periodic refresh."""
        try:
            return use(self.active(purpose))
        except KeyNotFound:
            self.refresh()
            return use(self.active(purpose))

    def encrypt(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """AES-256-GCM with the active data key; ``aad`` binds the ciphertext to its context.

        The result is ``kid || 0x00 || nonce || ciphertext || tag``, so that it decrypts after
        a rotation. Nonces are random (96 bits): NIST SP 800-38D §8.3 allows 2^32 messages
        per key; rotate the data key long before (``tapsign hsm rotate data-encryption``).
        """
        nonce = secrets.token_bytes(NONCE_LENGTH)

        def encrypt(key: KeyInfo) -> bytes:
            ciphertext = self._store.encrypt(kid=key.kid, nonce=nonce, plaintext=plaintext, aad=aad)
            return key.kid.encode() + b"\x00" + nonce + ciphertext

        return self.with_active(KeyPurpose.DATA, encrypt)

    def decrypt(self, blob: bytes, *, aad: bytes) -> bytes:
        """The plaintext of :meth:`encrypt`'s output, or :class:`DecryptionFailed`."""
        kid, separator, rest = blob.partition(b"\x00")
        if not separator or len(rest) < NONCE_LENGTH + 16:
            raise DecryptionFailed("not data encrypted by this keyring")
        key = self.key(kid.decode("ascii", errors="replace"))
        if key.purpose is not KeyPurpose.DATA:
            raise DecryptionFailed("not data encrypted by this keyring")
        return self._store.decrypt(
            kid=key.kid, nonce=rest[:NONCE_LENGTH], ciphertext=rest[NONCE_LENGTH:], aad=aad
        )

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWK Set (RFC 7517 §5) of every published signing key."""
        return {"keys": [key.jwk() for key in self._keys if key.public_key is not None]}

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_keyring(settings: HsmSettings, *, pin: str) -> Keyring:
    """The keyring of the configured backend. The software backend only when asked for."""
    store: KeyStore
    if settings.backend == "software":
        store = SoftwareKeyStore(Path(settings.software_key_dir), pin)
    else:
        store = Pkcs11KeyStore(
            Pkcs11Token(
                module=settings.module,
                token_label=settings.token_label,
                pin=pin,
                max_sessions=settings.max_sessions,
                softhsm2_conf=settings.softhsm2_conf,
            ),
            # Beside SoftHSM2's configuration, where there is one; another module (a network
            # HSM) has no such file, and serialises key changes itself.
            lock=None
            if settings.softhsm2_conf is None or not Path(settings.softhsm2_conf).is_file()
            else Path(settings.softhsm2_conf).with_name("keyring.lock"),
        )
    return Keyring(store)
