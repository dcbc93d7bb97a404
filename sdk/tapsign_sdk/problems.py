"""The kinds of problem tapsign answers with (RFC 9457), as exceptions: the root of every
error tapsign raises on purpose, and the generic kinds (invalid input, not found, conflict,
unauthorized, unavailable …).

Each class carries the HTTP status and the problem ``type`` URI the server renders for it,
so the mapping from failure to response lives beside the failure (h11's
``error_status_hint`` is the model). They are part of the protocol: a client can match a
problem's ``type`` against ``InvalidInput.problem_type()``. The server's own kinds
(transaction not found, user not active …) subclass these in engine/errors.py and
hsm/errors.py.
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_BASE = "https://tapsign.dev/problems/"


class TapsignError(Exception):
    """Root of every error tapsign raises on purpose."""

    status: ClassVar[int] = 500
    problem: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    @classmethod
    def problem_type(cls) -> str:
        """The RFC 9457 ``type`` URI of this error class."""
        return PROBLEM_BASE + cls.problem


class ServiceUnavailable(TapsignError):
    """A dependency is temporarily unable to serve; the caller may retry later."""

    status = 503
    problem = "service-unavailable"
    title = "Service unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(ServiceUnavailable):
    """A bounded queue is full: shed this request now rather than queue it without bound."""

    problem = "overloaded"
    title = "Overloaded"


class TooManyRequests(TapsignError):
    """A client or device sent more requests than its rate limit; ``retry_after`` says
    when the next one will be accepted."""

    status = 429
    problem = "too-many-requests"
    title = "Too many requests"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigurationError(TapsignError):
    """The configuration (file or environment) is invalid; raised at start-up."""

    problem = "configuration-error"
    title = "Configuration error"


class InvalidInput(TapsignError):
    """A request is well formed but a value is not acceptable; ``field`` names it."""

    status = 422
    problem = "invalid-input"
    title = "Invalid input"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(TapsignError):
    status = 404
    problem = "not-found"
    title = "Not found"


class Conflict(TapsignError):
    """The request is valid but the current state of a record does not allow it."""

    status = 409
    problem = "conflict"
    title = "Conflict"


class BadRequest(TapsignError):
    """The request cannot be read: malformed JSON, wrong types, unknown fields."""

    status = 400
    problem = "bad-request"
    title = "Bad request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthorized(TapsignError):
    """Missing or invalid credentials. The message is generic on purpose (PSD2 RTS art.
    4(3)(a)); ``reason`` says what was wrong, for the audit trail only."""

    status = 401
    problem = "unauthorized"
    title = "Unauthorized"

    def __init__(self, reason: str) -> None:
        super().__init__("authentication failed")
        self.reason = reason


class Forbidden(TapsignError):
    """Valid credentials that do not allow this request (scope, user binding)."""

    status = 403
    problem = "forbidden"
    title = "Forbidden"


class UnsupportedMediaType(TapsignError):
    status = 415
    problem = "unsupported-media-type"
    title = "Unsupported media type"
