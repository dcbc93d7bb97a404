"""The relying-party side: a typed client of tapsign's ``/api/v1``.

::

    client = Client("http://127.0.0.1:8080", access_key="tsk_…")
    started = client.approve(
        username="u12345", message="Pay 12.50 EUR to Shop",
        amount="12.50", currency="EUR", payee=Payee(name="Shop", account="DE89…"),
    )
    status = client.wait_for_result(started.status_token)   # long-polls, no busy loop
    if status.status == "succeeded":
        assert client.introspect(status.token).active        # once; a replay is inactive

Every error is raised as :class:`ApiError` carrying the RFC 9457 problem.
"""

from __future__ import annotations

import time
from typing import Any, Literal, TypeVar
from uuid import UUID

import httpx
import msgspec

from tapsign_sdk import wire
from tapsign_sdk.wire import Payee

T = TypeVar("T")

__all__ = ["ApiError", "Client", "Payee"]


class ApiError(Exception):
    """A 4xx or 5xx answer, with its problem details."""

    def __init__(
        self,
        status: int,
        problem: wire.Problem | None,
        body: bytes,
        *,
        retry_after: float | None = None,
    ) -> None:
        detail = problem.detail if problem is not None else body[:200].decode(errors="replace")
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.problem = problem
        #: Seconds to wait before trying again, when the server said (503 and 429).
        self.retry_after = retry_after

    @property
    def problem_type(self) -> str | None:
        return self.problem.type if self.problem is not None else None


def raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = msgspec.json.decode(response.content, type=wire.Problem)
    except msgspec.MsgspecError:
        problem = None
    retry_after = response.headers.get("Retry-After", "")
    raise ApiError(
        response.status_code,
        problem,
        response.content,
        retry_after=float(retry_after) if retry_after.isdigit() else None,
    )


class Client:
    def __init__(
        self,
        base_url: str,
        access_key: str,
        *,
        timeout: float = 40.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)
        self._headers = {"Authorization": f"Bearer {access_key}"}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        result: type[T] | None,
        body: msgspec.Struct | None = None,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> T:
        response = self._http.request(
            method,
            path,
            content=None if body is None else msgspec.json.encode(body),
            headers={
                **self._headers,
                **({"Content-Type": "application/json"} if body is not None else {}),
                **(headers or {}),
            },
            params=params,
        )
        raise_for_problem(response)
        if result is None:
            return None  # type: ignore[return-value]
        return msgspec.json.decode(response.content, type=result)

    # -- operations ---------------------------------------------------------------------

    def enroll(
        self, *, username: str | None = None, user_id: UUID | None = None, **fields: Any
    ) -> wire.Enrolled:
        """Start registering a phone; show ``enrollment.qrCode`` or ``enrollment.appLinkUri``."""
        return self._call(
            "POST",
            "/api/v1/users/enroll",
            wire.Enrolled,
            wire.Enroll(username=username, user_id=user_id, **fields),
        )

    def approve(
        self, *, username: str | None = None, user_id: UUID | None = None, **fields: Any
    ) -> wire.Started:
        """An authentication, or a payment approval with ``amount``, ``currency``, ``payee``."""
        return self._call(
            "POST",
            "/api/v1/approval",
            wire.Started,
            wire.Approval(username=username, user_id=user_id, **fields),
        )

    def sign(
        self, text: str, *, username: str | None = None, user_id: UUID | None = None, **fields: Any
    ) -> wire.Started:
        """A consent signature; the successful status carries the consent JWT."""
        return self._call(
            "POST",
            "/api/v1/signature",
            wire.Started,
            wire.Signature(text=text, username=username, user_id=user_id, **fields),
        )

    def status(self, status_token: str, *, wait: float = 0) -> wire.Status:
        """The status; with ``wait`` the server holds the answer until it changes (≤ 30 s)."""
        return self._call(
            "POST",
            "/api/v1/status",
            wire.Status,
            wire.StatusQuery(status_token=status_token, wait=wait),
        )

    def wait_for_result(self, status_token: str, *, timeout: float = 330.0) -> wire.Status:
        """Long-poll until the transaction is no longer pending (or ``timeout`` passes)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            status = self.status(status_token, wait=max(0.0, min(30.0, remaining)))
            if status.status != "pending" or remaining <= 0:
                return status

    def transaction(self, transaction_id: UUID) -> wire.Status:
        return self._call("GET", f"/api/v1/transactions/{transaction_id}", wire.Status)

    def cancel(self, transaction_id: UUID) -> wire.Status:
        return self._call("POST", f"/api/v1/transactions/{transaction_id}/cancel", wire.Status)

    def intent(
        self,
        operation: Literal["enroll", "approve"],
        *,
        username: str | None = None,
        user_id: UUID | None = None,
    ) -> wire.IntentToken:
        return self._call(
            "POST",
            "/api/v1/intent",
            wire.IntentToken,
            wire.Intent(operation=operation, username=username, user_id=user_id),
        )

    def introspect(self, token: str) -> wire.Introspection:
        response = self._http.post(
            "/api/v1/introspect", data={"token": token}, headers=self._headers
        )
        raise_for_problem(response)
        return msgspec.json.decode(response.content, type=wire.Introspection)

    def jwks(self) -> dict[str, Any]:
        response = self._http.get("/.well-known/jwks.json")
        raise_for_problem(response)
        keys: dict[str, Any] = response.json()
        return keys

    # -- users and authenticators -------------------------------------------------------

    def create_user(self, username: str, attributes: dict[str, str] | None = None) -> wire.User:
        return self._call(
            "POST",
            "/api/v1/users",
            wire.User,
            wire.CreateUser(username=username, attributes=attributes or {}),
        )

    def get_user(self, user_id: UUID) -> wire.User:
        return self._call("GET", f"/api/v1/users/{user_id}", wire.User)

    def find_user(self, username: str) -> wire.User:
        return self._call("GET", "/api/v1/users", wire.User, params={"username": username})

    def update_attributes(
        self, user_id: UUID, *, set: dict[str, str] | None = None, remove: list[str] | None = None
    ) -> wire.User:
        return self._call(
            "PATCH",
            f"/api/v1/users/{user_id}/attributes",
            wire.User,
            wire.UpdateAttributes(set=set or {}, remove=remove or []),
        )

    def lock_user(self, user_id: UUID) -> wire.User:
        return self._call("POST", f"/api/v1/users/{user_id}/lock", wire.User)

    def unlock_user(self, user_id: UUID) -> wire.User:
        return self._call("POST", f"/api/v1/users/{user_id}/unlock", wire.User)

    def deactivate_user(self, user_id: UUID) -> wire.User:
        return self._call("POST", f"/api/v1/users/{user_id}/deactivate", wire.User)

    def delete_user(self, user_id: UUID) -> None:
        self._call("DELETE", f"/api/v1/users/{user_id}", None)

    def get_authenticator(self, authenticator_id: UUID) -> wire.Authenticator:
        return self._call("GET", f"/api/v1/authenticators/{authenticator_id}", wire.Authenticator)

    def lock_authenticator(self, authenticator_id: UUID) -> wire.Authenticator:
        return self._call(
            "POST", f"/api/v1/authenticators/{authenticator_id}/lock", wire.Authenticator
        )

    def unlock_authenticator(self, authenticator_id: UUID) -> wire.Authenticator:
        return self._call(
            "POST", f"/api/v1/authenticators/{authenticator_id}/unlock", wire.Authenticator
        )

    def delete_authenticator(self, authenticator_id: UUID) -> None:
        self._call("DELETE", f"/api/v1/authenticators/{authenticator_id}", None)
