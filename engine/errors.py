"""The engine's own problems: users, devices and transactions that are missing, not active
or not pending. Their roots, and the generic problems, are tapsign_sdk/problems.py's.
"""

from __future__ import annotations

from tapsign_sdk.problems import Conflict, NotFound, TooManyRequests


class TooManyPending(TooManyRequests):
    """The user has as many pending operations as allowed; one must end first."""

    problem = "too-many-pending"
    title = "Too many pending transactions"


class UserNotFound(NotFound):
    problem = "user-not-found"
    title = "User not found"


class DeviceNotFound(NotFound):
    problem = "authenticator-not-found"
    title = "Authenticator not found"


class OperationNotFound(NotFound):
    problem = "transaction-not-found"
    title = "Transaction not found"


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
