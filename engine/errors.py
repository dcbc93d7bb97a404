"""The one exception hierarchy of tapsign.

Every error that crosses a package boundary is a :class:`TapsignError`. Each class
carries the HTTP status and the RFC 9457 problem ``type`` that the API renders
for it, so the mapping from failure to response lives beside the failure and not
in a table somewhere else (h11's ``error_status_hint`` is the model).
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


class TooManyPending(TooManyRequests):
    """The user has as many pending operations as allowed; one must end first."""

    problem = "too-many-pending"
    title = "Too many pending transactions"


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


class UserNotFound(NotFound):
    problem = "user-not-found"
    title = "User not found"


class DeviceNotFound(NotFound):
    problem = "authenticator-not-found"
    title = "Authenticator not found"


class OperationNotFound(NotFound):
    problem = "transaction-not-found"
    title = "Transaction not found"


class Conflict(TapsignError):
    """The request is valid but the current state of a record does not allow it."""

    status = 409
    problem = "conflict"
    title = "Conflict"


class UsernameTaken(Conflict):
    problem = "username-taken"
    title = "Username taken"


class UserNotActive(Conflict):
    problem = "user-not-active"
    title = "User not active"


class DeviceNotActive(Conflict):
    problem = "authenticator-not-active"
    title = "Authenticator not active"


class TooManyAuthenticators(Conflict):
    """The user has as many authenticators (enrolled or being enrolled) as allowed."""

    problem = "too-many-authenticators"
    title = "Too many authenticators"


class OperationNotPending(Conflict):
    """The operation has ended (or is being completed): answers and cancels are refused.

    A replayed answer lands here and changes nothing (PSD2 RTS art. 4(1)).
    """

    problem = "transaction-not-pending"
    title = "Transaction not pending"


class IllegalTransition(Conflict):
    """The state machine refused an event in the current state; the state is unchanged."""

    problem = "illegal-transition"
    title = "Illegal transition"


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
