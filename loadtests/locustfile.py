"""Locust scenarios: each simulated user is a relying party together with its user's phone.

A complete SCA transaction -- the relying party starts it, the phone fetches it over a
signed request, the user's answer is signed and sent, the relying party sees the final
status through the long-poll -- is reported to Locust as request type ``SCA`` under the
scenario's name, beside the HTTP calls it is made of. Each transaction's exact duration
is also written to ``$TAPSIGN_LOADTEST_TIMINGS.<pid>`` (Locust rounds its percentiles).

A start the server sheds (503 with ``Retry-After``, api/admission.py) is what a saturated
tapsign should do, not an error: it is reported as request type ``SHED``, and the user
waits the ``Retry-After`` seconds as a well-behaved relying party would.

Phones are enrolled when a user starts, with a separate HTTP client, and the statistics
are reset once every user runs (``--reset-stats``), so the measured phase measures
approvals. Scenario: ``TAPSIGN_LOADTEST_SCENARIO`` = ``mixed`` (default), ``enrolment``,
``login``, ``payment``, ``consent`` or ``decline``. The access key:
``TAPSIGN_LOADTEST_ACCESS_KEY``. Several hosts on one database: their URLs in
``TAPSIGN_LOADTEST_HOSTS`` (comma-separated); each user's relying party then talks to one
of them and its phone to the next, so that every answer lands on a host that did not
start the transaction.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import msgspec
from locust import FastHttpUser, constant, events, task
from locust.env import Environment

from tapsign_sdk import wire
from tapsign_sdk.client import Client
from tapsign_sdk.device import Authenticator, Device, answer_message
from tapsign_sdk.model import Decision
from tapsign_sdk.request import sign_headers

ACCESS_KEY = os.environ.get("TAPSIGN_LOADTEST_ACCESS_KEY", "")
SCENARIO = os.environ.get("TAPSIGN_LOADTEST_SCENARIO", "mixed")
TIMINGS = os.environ.get("TAPSIGN_LOADTEST_TIMINGS")
#: Several hosts on one database (``make loadtest HOSTS=3``): each simulated user's relying
#: party talks to one host and its phone to the next.
HOSTS = [url for url in os.environ.get("TAPSIGN_LOADTEST_HOSTS", "").split(",") if url]
_users = itertools.count()
#: The mixed scenario: mostly payments and logins, some enrolments, consents and declines.
MIX = {"payment": 45, "login": 40, "enrolment": 5, "consent": 5, "decline": 5}
SHOP = {"name": "Coffee Shop", "account": "DE89 3704 0044 0532 0130 00"}

#: (started, seconds, scenario, outcome: "ok", "failed" or "shed")
_timings: list[tuple[float, float, str, str]] = []
#: httpx (the set-up's SDK calls) logs every request at INFO, Locust's level.
logging.getLogger("httpx").setLevel(logging.WARNING)
_started = msgspec.json.Decoder(wire.Started)
_status = msgspec.json.Decoder(wire.Status)
_answer_result = msgspec.json.Decoder(wire.AnswerResult)
_device_operation = msgspec.json.Decoder(wire.DeviceOperation)
_enrolled = msgspec.json.Decoder(wire.Enrolled)


class TransactionFailed(Exception):
    pass


class Shed(Exception):
    """The server refused to start the transaction for now."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"shed; retry after {retry_after:g} s")
        self.retry_after = retry_after


def _measure_from_here(user_count: int, **_: Any) -> None:
    _timings.clear()


def _write_timings(environment: Environment, **_: Any) -> None:
    if TIMINGS is None:
        return
    with open(f"{TIMINGS}.{os.getpid()}", "w", encoding="utf-8") as file:
        for started, seconds, name, outcome in _timings:
            file.write(f"{started:.6f},{seconds:.6f},{name},{outcome}\n")


events.spawning_complete.add_listener(_measure_from_here)  # type: ignore[no-untyped-call]
events.test_stop.add_listener(_write_timings)  # type: ignore[no-untyped-call]


class RelyingPartyWithPhone(FastHttpUser):
    """One relying-party backend session and one enrolled phone, transacting back to back."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.authorization = {"Authorization": f"Bearer {ACCESS_KEY}"}
        hosts = HOSTS or [self.host or ""]
        number = next(_users)
        self.base = hosts[number % len(hosts)]
        self.phone_base = hosts[(number + 1) % len(hosts)]
        self.jwks = httpx.get(f"{self.base}/.well-known/jwks.json").json()
        self.username, self.phone, self.phone_id = self._enrol_outside_the_measurement()
        weights = MIX if SCENARIO == "mixed" else {SCENARIO: 1}
        self.scenarios: list[Callable[[], None]] = [getattr(self, name) for name in weights]
        self.weights = list(weights.values())

    def _enrol_outside_the_measurement(self) -> tuple[str, Authenticator, Any]:
        username = f"load-{secrets.token_hex(6)}"
        with Client(self.base, ACCESS_KEY) as client:
            started = client.enroll(username=username)
            phone = Device(self.phone_base)
            try:
                phone.enroll(started.enrollment.app_link_uri)
            finally:
                phone.close()
        return username, phone.authenticator, phone.authenticator_id

    @task
    def transact(self) -> None:
        scenario = random.choices(self.scenarios, self.weights)[0]
        began, started_at = time.perf_counter(), time.time()
        error: Exception | None = None
        shed: Shed | None = None
        try:
            scenario()
        except Shed as exc:
            shed = exc
        except Exception as exc:  # any failure is the transaction's failure
            error = exc
        seconds = time.perf_counter() - began
        name = scenario.__name__
        outcome = "shed" if shed else "failed" if error else "ok"
        _timings.append((started_at, seconds, name, outcome))
        self.environment.events.request.fire(
            request_type="SHED" if shed else "SCA",
            name=name,
            response_time=seconds * 1000,
            response_length=0,
            exception=error,
            context={},
        )
        if shed is not None:
            time.sleep(shed.retry_after)

    # -- the scenarios ----------------------------------------------------------------------

    def login(self) -> None:
        self._approve({"username": self.username, "message": "Log in to Demo Bank"})

    def payment(self) -> None:
        amount = f"{random.randint(1, 99999) / 100:.2f}"
        self._approve(
            {
                "username": self.username,
                "message": f"Pay {amount} EUR to Coffee Shop",
                "amount": amount,
                "currency": "EUR",
                "payee": SHOP,
            }
        )

    def decline(self) -> None:
        self._approve({"username": self.username, "message": "Log in?"}, decision=Decision.DECLINE)

    def consent(self) -> None:
        text = f"I agree to the terms, version {random.randint(1, 50)}."
        status = self._approve({"username": self.username, "text": text}, path="/api/v1/signature")
        consent = status.consent or ""
        key = jwt.PyJWKSet.from_dict(self.jwks)[jwt.get_unverified_header(consent)["kid"]]
        claims = jwt.decode(consent, key=key, algorithms=["ES256"], options={"verify_aud": False})
        if claims["consent"]["text"] != text:
            raise TransactionFailed("the consent JWT does not hold the text signed")

    def enrolment(self) -> None:
        response = self._post(
            "/api/v1/users/enroll",
            {"username": f"load-{secrets.token_hex(6)}"},
            self.authorization,
            starts=True,
        )
        enrolled = _enrolled.decode(response)
        token = Device.dispatch_token(enrolled.enrollment.app_link_uri)
        redeemed = _device_operation.decode(
            self._post("/device/v1/redeem", {"dispatchToken": token}, {}, phone=True)
        )
        phone = Authenticator()
        signed = phone.answer(redeemed)
        body = msgspec.to_builtins(answer_message(signed))
        self._post(
            f"/device/v1/operations/{redeemed.id}/answer",
            body,
            {"Authorization": f"Bearer {token}"},
            name="POST /device/v1/operations/[id]/answer",
            phone=True,
        )
        self._final_status(enrolled.enrollment.status_token, expected="succeeded")

    # -- the parts ------------------------------------------------------------------------

    def _approve(
        self,
        request: dict[str, Any],
        *,
        path: str = "/api/v1/approval",
        decision: Decision = Decision.APPROVE,
    ) -> wire.Status:
        started = _started.decode(self._post(path, request, self.authorization, starts=True))
        operation = self._fetch(started.transaction_id)
        signed = self.phone.answer(operation, decision=decision)
        answer_path = f"/device/v1/operations/{operation.id}/answer"
        body = msgspec.json.encode(answer_message(signed))
        headers = {
            "Content-Type": "application/json",
            **sign_headers(
                authenticator_id=self.phone_id,
                signer=self.phone,
                method="POST",
                path=answer_path,
                body=body,
            ),
        }
        with self.client.post(
            self.phone_base + answer_path,
            data=body.decode(),
            headers=headers,
            name="POST /device/v1/operations/[id]/answer",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                raise TransactionFailed(f"answer refused: HTTP {response.status_code}")
        expected = "succeeded" if decision is Decision.APPROVE else "failed"
        return self._final_status(started.status_token, expected=expected)

    def _fetch(self, transaction_id: Any) -> wire.DeviceOperation:
        """What a phone woken by a push does: fetch the transaction the push named."""
        path = f"/device/v1/operations/{transaction_id}"
        headers = sign_headers(
            authenticator_id=self.phone_id, signer=self.phone, method="GET", path=path, body=b""
        )
        with self.client.get(
            self.phone_base + path,
            headers=headers,
            name="GET /device/v1/operations/[id]",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                raise TransactionFailed(f"fetch refused: HTTP {response.status_code}")
            return _device_operation.decode(response.content)

    def _final_status(self, status_token: str, *, expected: str) -> wire.Status:
        for _ in range(20):
            status = _status.decode(
                self._post("/api/v1/status", {"statusToken": status_token, "wait": 10}, {})
            )
            if status.status != "pending":
                break
        if status.status != expected:
            raise TransactionFailed(f"ended {status.status} ({status.reason}), not {expected}")
        return status

    def _post(
        self,
        path: str,
        document: Any,
        headers: dict[str, str],
        *,
        name: str | None = None,
        starts: bool = False,
        phone: bool = False,
    ) -> bytes:
        """POST to the relying party's host, or to the phone's (``phone``)."""
        body = msgspec.json.encode(document)
        with self.client.post(
            (self.phone_base if phone else self.base) + path,
            data=body.decode(),
            headers={"Content-Type": "application/json", **headers},
            name=name or f"POST {path}",
            catch_response=True,
        ) as response:
            retry_after = response.headers.get("Retry-After", "")
            if starts and response.status_code == 503 and retry_after.isdigit():
                response.success()
                raise Shed(float(retry_after))
            if not 200 <= response.status_code < 300:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                raise TransactionFailed(f"{path}: HTTP {response.status_code}")
            return bytes(response.content)
