"""Errors of the HSM layer.

Every failure of the key service or the verifier reaches the rest of tapsign as one
of these; :mod:`hsm.pkcs11_token` is the only place that turns python-pkcs11's
``PKCS11Error`` into them. The split that matters to callers is *transient* (retry
later: the API answers 503 with ``Retry-After``) against *permanent* (a configuration
or programming fault that retrying will not fix).
"""

from __future__ import annotations

from tapsign_sdk.problems import ServiceUnavailable, TapsignError


class HsmError(TapsignError):
    """Root of the HSM layer's errors: permanent unless a subclass says otherwise."""

    problem = "hsm-error"
    title = "HSM error"


class HsmTransientError(HsmError, ServiceUnavailable):
    """The HSM cannot serve now (busy, out of sessions, token away); retrying may succeed."""

    problem = "hsm-unavailable"
    title = "HSM unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        ServiceUnavailable.__init__(self, message, retry_after=retry_after)


class SessionLost(HsmTransientError):
    """The session or the login it relied on is gone; :class:`~hsm.pkcs11_token.Pkcs11Token`
    reconnects and retries once before letting this reach a caller."""


class HsmPermanentError(HsmError):
    """A fault that retrying will not fix: wrong module, token, PIN, mechanism or template."""


class KeyNotFound(HsmPermanentError):
    """No usable key with the requested purpose or key id. A server missing a key it signs
    with cannot serve (503); the caller did nothing wrong."""

    status = 503
    problem = "key-not-found"
    title = "Key not found"


class KeyringError(HsmPermanentError):
    """A key lifecycle request that would break an invariant (e.g. retiring the active key)."""

    status = 409
    problem = "key-lifecycle-conflict"
    title = "Key lifecycle conflict"


class InvalidPublicKey(HsmError):
    """A public key handed to the verifier is not a P-256 point or SPKI document."""

    status = 400
    problem = "invalid-public-key"
    title = "Invalid public key"


class InvalidToken(TapsignError):
    """A JWT failed verification. The message is generic on purpose (PSD2 RTS art. 4(3)(a));
    the specific reason is in ``reason`` for the audit log only."""

    status = 401
    problem = "invalid-token"
    title = "Invalid token"

    def __init__(self, reason: str) -> None:
        super().__init__("the token is not valid")
        self.reason = reason


class DecryptionFailed(HsmPermanentError):
    """Data encrypted by the keyring failed authentication: altered, truncated or foreign."""

    problem = "decryption-failed"
    title = "Decryption failed"
