"""JWTs signed in the HSM, through PyJWT.

Signing: PyJWT's ``ES256`` hashes with SHA-256 and asks the key to sign; here the "key" is a
reference to a keyring key, and the keyring hashes on the host and signs the digest on the
token (SoftHSM2 has no ``CKM_ECDSA_SHA256``). PKCS#11 ``CKM_ECDSA`` returns ``r || s``,
which is already the JWS form (RFC 7518 §3.4), so nothing is converted.

Verifying needs no HSM: the ``kid`` in the header picks a published public key of the
expected purpose, and plain PyJWT checks signature and claims with ``ES256`` pinned (so
``alg: none`` and algorithm confusion are refused before any key is looked at).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm

from hsm.errors import InvalidToken, KeyNotFound
from hsm.keyring import KeyInfo, KeyPurpose, Keyring

ALGORITHM = "ES256"


@dataclass(frozen=True, slots=True)
class _KeyringKey:
    """Stands in for a private key in PyJWT: signing goes to the keyring."""

    keyring: Keyring
    kid: str


class _KeyringES256(ECAlgorithm):
    """PyJWT's ES256, taught to sign with a :class:`_KeyringKey`."""

    def __init__(self) -> None:
        super().__init__(ECAlgorithm.SHA256)

    def prepare_key(self, key: Any) -> Any:
        if isinstance(key, _KeyringKey):
            return key
        return super().prepare_key(key)

    def sign(self, msg: bytes, key: Any) -> bytes:
        if isinstance(key, _KeyringKey):
            return key.keyring.sign(key.kid, msg)
        return super().sign(msg, key)


_signing_jws = jwt.PyJWS(algorithms=[])
_signing_jws.register_algorithm(ALGORITHM, _KeyringES256())


class TokenSigner:
    """Issues and checks JWTs with the keys of one purpose. ``encode`` blocks on the HSM."""

    def __init__(self, keyring: Keyring, purpose: KeyPurpose, *, issuer: str) -> None:
        if purpose.kind != "signing":
            raise ValueError(f"{purpose.value} keys do not sign")
        self.keyring = keyring
        self.purpose = purpose
        self.issuer = issuer

    def encode(self, claims: Mapping[str, Any], *, token_type: str = "JWT") -> str:  # noqa: S107
        """A compact JWS of ``claims`` (plus ``iss``) signed with the purpose's active key."""
        payload = json.dumps({"iss": self.issuer, **claims}, separators=(",", ":")).encode()

        def encode(key: KeyInfo) -> str:
            return _signing_jws.encode(
                payload,
                _KeyringKey(self.keyring, key.kid),  # type: ignore[arg-type] # see _KeyringES256
                algorithm=ALGORITHM,
                headers={"kid": key.kid, "typ": token_type},
            )

        return self.keyring.with_active(self.purpose, encode)

    def decode(
        self,
        token: str,
        *,
        audience: str | Sequence[str] | None = None,
        required: Sequence[str] = ("iat", "exp"),
        leeway: float = 5.0,
    ) -> dict[str, Any]:
        """The verified claims of ``token``; :class:`InvalidToken` for anything wrong.

        The leeway (seconds) absorbs clock skew between tapsign nodes; it is small on
        purpose (PSD2 RTS art. 4(3)(d) counts minutes).
        """
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if not isinstance(kid, str):
                raise InvalidToken("no kid in the header")
            key = self.keyring.key(kid)
            if key.purpose is not self.purpose or key.public_key is None:
                raise InvalidToken(f"kid {kid} belongs to {key.purpose.value}")
            return jwt.decode(
                token,
                key=key.public_key,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self.issuer,
                leeway=leeway,
                options={"require": ["iss", *required], "verify_aud": audience is not None},
            )
        except KeyNotFound as exc:
            raise InvalidToken("unknown kid") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"{type(exc).__name__}: {exc}") from exc
