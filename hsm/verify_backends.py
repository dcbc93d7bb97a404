"""Batch verification of ECDSA P-256 signatures, run in a worker thread.

A backend takes a whole batch in one call, so the verifier pays one thread hop per batch.
Each item's result is ``True``, ``False`` or the error of that item alone (a malformed
public key): one bad item never fails its neighbours.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.types import VerifyMixin

from hsm import _p256, ecdsa
from hsm.errors import InvalidPublicKey
from hsm.keyring import Keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.pkcs11_token import Pkcs11Token, PooledSession, can_verify
from hsm.settings import VerifierSettings
from tapsign_sdk.problems import ConfigurationError

#: ``(public key, message, signature)`` in any of the formats of :mod:`hsm.ecdsa`.
VerifyItem = tuple[bytes, bytes, bytes]
Outcome = bool | InvalidPublicKey

_VALID, _KEY_REJECTED = 1, 2


class VerifyBackend(Protocol):
    name: str

    def verify_batch(self, batch: Sequence[VerifyItem]) -> list[Outcome]:
        """Blocking; called from a worker thread, from several threads at once."""
        ...


class _Prepared:
    """A batch after host-side checks: outcomes so far, and the well-formed items left.

    Items with a malformed key get their error and those with a malformed signature
    ``False`` here; ``work[i]`` is ``(point, message, r || s)`` for ``outcomes[positions[i]]``.
    """

    __slots__ = ("outcomes", "positions", "work")

    def __init__(self, batch: Sequence[VerifyItem], point: Callable[[bytes], bytes]) -> None:
        self.outcomes: list[Outcome] = []
        self.positions: list[int] = []
        self.work: list[tuple[bytes, bytes, bytes]] = []
        for public_key, message, signature in batch:
            try:
                validated = point(public_key)
            except InvalidPublicKey as exc:
                self.outcomes.append(exc)
                continue
            raw = ecdsa.raw_signature(signature)
            if raw is not None:
                self.positions.append(len(self.outcomes))
                self.work.append((validated, message, raw))
            self.outcomes.append(False)


def _cached_point(size: int) -> Callable[[bytes], bytes]:
    """Public key (point or SPKI) to its validated uncompressed point, remembered.

    functools.lru_cache is thread-safe; failures (InvalidPublicKey) are not remembered.
    """

    def point(public_key: bytes) -> bytes:
        return ecdsa.encode_point(ecdsa.load_public_key(public_key))

    return functools.lru_cache(maxsize=size)(point)


class OpenSSLVerifyBackend:
    """libcrypto's ECDSA, the whole batch in C without the GIL (:mod:`hsm._p256`).

    Keys and signatures are parsed and checked in Python by :mod:`hsm.ecdsa`; the
    extension receives only a validated point, the message and ``r || s``.
    """

    name = "openssl"

    def __init__(self, *, key_cache: int = 4096) -> None:
        self._point = _cached_point(key_cache)

    def verify_batch(self, batch: Sequence[VerifyItem]) -> list[Outcome]:
        prepared = _Prepared(batch, self._point)
        results = _p256.verify_batch(tuple(prepared.work))
        for position, result in zip(prepared.positions, results, strict=True):
            prepared.outcomes[position] = (
                InvalidPublicKey("libcrypto rejected the public key")
                if result == _KEY_REJECTED
                else result == _VALID
            )
        return prepared.outcomes


def import_public_key(pooled: PooledSession, point: bytes) -> VerifyMixin:
    """A P-256 public key as a session object (gone when the session closes)."""
    created = pooled.session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.TOKEN: False,
            Attribute.VERIFY: True,
            Attribute.EC_PARAMS: ecdsa.P256_EC_PARAMS,
            # CKA_EC_POINT is the DER OCTET STRING of the point (PKCS#11 v2.40 §2.3.3).
            Attribute.EC_POINT: b"\x04\x41" + point,
        }
    )
    return can_verify(created)


class Pkcs11VerifyBackend:
    """``C_Verify`` on the token, with public keys imported once per session.

    Creating the key object for every verification halves throughput (DESIGN.md), so each
    pooled session keeps its imported keys, least recently used evicted and destroyed.
    The message is hashed on the host: SoftHSM2 offers ``CKM_ECDSA`` but not
    ``CKM_ECDSA_SHA256``.
    """

    name = "pkcs11"

    def __init__(self, token: Pkcs11Token, *, key_cache: int = 4096) -> None:
        self._token = token
        self._key_cache = max(key_cache, 1)
        self._point = _cached_point(key_cache)

    def verify_batch(self, batch: Sequence[VerifyItem]) -> list[Outcome]:
        prepared = _Prepared(batch, self._point)
        work = [
            (point, hashlib.sha256(message).digest(), raw) for point, message, raw in prepared.work
        ]

        def verify(pooled: PooledSession) -> list[bool]:
            return [
                self._session_key(pooled, point).verify(digest, raw, mechanism=Mechanism.ECDSA)
                for point, digest, raw in work
            ]

        if work:
            for position, valid in zip(prepared.positions, self._token.run(verify), strict=True):
                prepared.outcomes[position] = valid
        return prepared.outcomes

    def _session_key(self, pooled: PooledSession, point: bytes) -> VerifyMixin:
        cache = pooled.public_keys
        key = cache.get(point)
        if key is not None:
            cache.move_to_end(point)
            return key
        key = cache[point] = import_public_key(pooled, point)
        if len(cache) > self._key_cache:
            _, evicted = cache.popitem(last=False)
            if isinstance(evicted, pkcs11.Object):
                evicted.destroy()
        return key


def make_verify_backend(settings: VerifierSettings, keyring: Keyring | None) -> VerifyBackend:
    """The configured backend; PKCS#11 verification shares the keyring's logged-in token."""
    if settings.backend == "openssl":
        return OpenSSLVerifyBackend(key_cache=settings.key_cache)
    store = keyring.store if keyring is not None else None
    if not isinstance(store, Pkcs11KeyStore):
        raise ConfigurationError("verifier.backend = 'pkcs11' needs hsm.backend = 'pkcs11'")
    return Pkcs11VerifyBackend(store.token, key_cache=settings.key_cache)
