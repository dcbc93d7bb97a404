"""The device side of tapsign: what a phone's SDK does with its key.

A phone holds a device-bound P-256 key (Secure Enclave, Android Keystore; here a software
key from ``cryptography``), keeps a signature counter, and answers operations by signing
the payload of tapsign_sdk/payload.py, the one definition both sides use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import httpx
import msgspec
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tapsign_sdk import wire
from tapsign_sdk.client import raise_for_problem
from tapsign_sdk.model import Attestation, Decision, DeviceAnswer, OperationKind, UserVerification
from tapsign_sdk.payload import Signable, signed_payload
from tapsign_sdk.request import sign_headers


class Addressed(Signable, Protocol):
    """An operation as the phone knows it: what it signs, and which device it is for."""

    @property
    def device_id(self) -> UUID: ...


def answer_message(signed: DeviceAnswer) -> wire.Answer:
    """What a phone sends for its signed answer (``POST …/answer``)."""
    return wire.Answer(
        decision=signed.decision,
        user_verification=signed.user_verification,
        counter=signed.counter,
        signature=signed.signature,
        public_key=signed.public_key,
        name=signed.device_name,
        platform=signed.platform,
        attestation=signed.attestation,
    )


class Attester(Protocol):
    """What the phone's platform says about a new key: Android key attestation or App
    Attest (docs/reference/device-protocol.md)."""

    def __call__(self, challenge: bytes, public_key: bytes) -> Attestation: ...


class Authenticator:
    """A phone's key, its counter and, once enrolled, its authenticator id."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        *,
        name: str = "test phone",
        platform: str = "ios",
        attester: Attester | None = None,
    ) -> None:
        self.private_key = private_key or ec.generate_private_key(ec.SECP256R1())
        self.name = name
        self.platform = platform
        #: Attests the key at enrolment; None sends no attestation.
        self.attester = attester
        self.counter = 0

    @property
    def public_key(self) -> bytes:
        """The 65-byte uncompressed point, as iOS exports it."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def sign(self, payload: bytes) -> bytes:
        """DER ECDSA/SHA-256, as ``SecKeyCreateSignature`` and Android's ``Signature`` give."""
        return self.private_key.sign(payload, ec.ECDSA(hashes.SHA256()))

    def answer(
        self,
        operation: Addressed,
        *,
        decision: Decision = Decision.APPROVE,
        user_verification: UserVerification = UserVerification.BIOMETRIC,
    ) -> DeviceAnswer:
        """Sign ``operation`` as shown, with the next counter value."""
        self.counter += 1
        registering = operation.kind is OperationKind.REGISTRATION
        device_id = operation.device_id
        payload = signed_payload(
            operation,
            device_id=device_id,
            decision=decision,
            user_verification=user_verification,
            counter=self.counter,
            public_key=self.public_key if registering else None,
        )
        return DeviceAnswer(
            device_id=device_id,
            decision=decision,
            user_verification=user_verification,
            counter=self.counter,
            signature=self.sign(payload),
            public_key=self.public_key if registering else None,
            device_name=self.name if registering else None,
            platform=self.platform if registering else None,
            attestation=(
                self.attester(operation.challenge, self.public_key)
                if registering and self.attester is not None
                else None
            ),
        )


class Device:
    """A phone talking to tapsign's device API: enrol, fetch, show, approve, decline.

    ::

        phone = Device("http://127.0.0.1:8080")
        phone.enroll(app_link)                  # the text of the QR code, or the app link
        for operation in phone.pending():       # fetch channel (signed requests)
            print(phone.show(operation))        # what the user sees and signs
            phone.approve(operation)

    The key is kept in memory, or in a keystore file (:meth:`save`, :meth:`load`) standing
    in for the Secure Enclave or Android Keystore.
    """

    def __init__(
        self,
        base_url: str,
        *,
        authenticator: Authenticator | None = None,
        authenticator_id: UUID | None = None,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.authenticator = authenticator or Authenticator()
        self.authenticator_id = authenticator_id
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    # -- keystore -------------------------------------------------------------------------

    def save(self, path: Path, passphrase: bytes) -> None:
        """Write key, counter and authenticator id to ``path`` (0600), the key encrypted."""
        record = {
            "authenticatorId": str(self.authenticator_id) if self.authenticator_id else None,
            "counter": self.authenticator.counter,
            "name": self.authenticator.name,
            "platform": self.authenticator.platform,
            "key": self.authenticator.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase),
            ).decode(),
        }
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(record, file)

    @classmethod
    def load(cls, path: Path, passphrase: bytes, base_url: str) -> Device:
        record = json.loads(path.read_text())
        key = serialization.load_pem_private_key(record["key"].encode(), passphrase)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the keystore does not hold an EC key")
        authenticator = Authenticator(key, name=record["name"], platform=record["platform"])
        authenticator.counter = record["counter"]
        identifier = record["authenticatorId"]
        return cls(
            base_url,
            authenticator=authenticator,
            authenticator_id=UUID(identifier) if identifier else None,
        )

    # -- the device API -------------------------------------------------------------------

    @staticmethod
    def dispatch_token(link: str) -> str:
        """The dispatch token in an app link or a scanned QR code's text."""
        query = parse_qs(urlsplit(link).query)
        tokens = query.get("dispatchToken") or query.get("dispatchTokenResponse")
        if not tokens:
            raise ValueError("not a tapsign app link: no dispatchToken in it")
        return tokens[0]

    def redeem(self, link: str) -> wire.DeviceOperation:
        """The transaction behind a QR code or app link."""
        response = self._http.post(
            "/device/v1/redeem",
            content=msgspec.json.encode(wire.Redeem(dispatch_token=self.dispatch_token(link))),
            headers={"Content-Type": "application/json"},
        )
        raise_for_problem(response)
        return msgspec.json.decode(response.content, type=wire.DeviceOperation)

    def enroll(self, link: str, *, decision: Decision = Decision.APPROVE) -> wire.AnswerResult:
        """Register this phone from the QR code's text or the app link of an enrolment."""
        operation = self.redeem(link)
        if operation.kind is not OperationKind.REGISTRATION:
            raise ValueError(f"this link is for an {operation.kind.value}, not an enrolment")
        result = self._answer(
            operation, decision, UserVerification.BIOMETRIC, token=self.dispatch_token(link)
        )
        if result.status == "succeeded":
            self.authenticator_id = result.authenticator_id
        return result

    def pending(self) -> list[wire.DeviceOperation]:
        """This phone's pending transactions, oldest first (the fetch channel: a signed
        request for each page)."""
        found: list[wire.DeviceOperation] = []
        path = "/device/v1/operations"
        while True:
            response = self._http.get(path, headers=self._signed("GET", path, b""))
            raise_for_problem(response)
            page = msgspec.json.decode(response.content, type=wire.PendingOperations)
            found.extend(page.operations)
            if page.next is None:
                return found
            path = f"/device/v1/operations?after={page.next}"

    def fetch(self, transaction_id: UUID) -> wire.DeviceOperation:
        """One pending transaction, by the id the push that woke the app carried."""
        path = f"/device/v1/operations/{transaction_id}"
        response = self._http.get(path, headers=self._signed("GET", path, b""))
        raise_for_problem(response)
        return msgspec.json.decode(response.content, type=wire.DeviceOperation)

    def show(self, operation: wire.DeviceOperation) -> str:
        """What the phone shows before the user decides."""
        lines = [f"{operation.kind.value}: {operation.message}".rstrip(": ")]
        if operation.payment is not None:
            payment, payee = operation.payment, operation.payment.payee
            lines.append(
                f"pay {payment.amount} {payment.currency} to {payee.name} ({payee.account})"
            )
        if operation.text:
            lines.append(operation.text)
        if operation.pre_context:
            lines.append(operation.pre_context)
        return "\n".join(lines)

    def approve(
        self,
        operation: wire.DeviceOperation,
        *,
        user_verification: UserVerification = UserVerification.BIOMETRIC,
        shown: wire.DeviceOperation | None = None,
    ) -> wire.AnswerResult:
        """Approve. ``shown`` signs another version of the operation (tests and the demo
        use it to show that a tampered amount does not verify)."""
        return self._answer(
            shown or operation, Decision.APPROVE, user_verification, target=operation.id
        )

    def decline(self, operation: wire.DeviceOperation) -> wire.AnswerResult:
        return self._answer(operation, Decision.DECLINE, UserVerification.BIOMETRIC)

    def _answer(
        self,
        operation: wire.DeviceOperation,
        decision: Decision,
        user_verification: UserVerification,
        *,
        token: str | None = None,
        target: UUID | None = None,
    ) -> wire.AnswerResult:
        signed = self.authenticator.answer(
            operation, decision=decision, user_verification=user_verification
        )
        body = msgspec.json.encode(answer_message(signed))
        path = f"/device/v1/operations/{target or operation.id}/answer"
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        else:
            headers.update(self._signed("POST", path, body))
        response = self._http.post(path, content=body, headers=headers)
        raise_for_problem(response)
        return msgspec.json.decode(response.content, type=wire.AnswerResult)

    def _signed(self, method: str, path: str, body: bytes) -> dict[str, str]:
        if self.authenticator_id is None:
            raise ValueError("this phone is not enrolled yet")
        return sign_headers(
            authenticator_id=self.authenticator_id,
            signer=self.authenticator,
            method=method,
            path=path,
            body=body,
        )
