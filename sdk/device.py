"""The device side of tapsign: what a phone's SDK does with its key.

A phone holds a device-bound P-256 key (Secure Enclave, Android Keystore; here a software
key from ``cryptography``), keeps a signature counter, and answers operations by signing
the payload of engine/payload.py, the one definition both sides use.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.model import Decision, DeviceAnswer, Operation, OperationKind, UserVerification
from engine.payload import signed_payload


class Authenticator:
    """A phone's key, its counter and, once enrolled, its authenticator id."""

    def __init__(
        self,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        *,
        name: str = "test phone",
        platform: str = "ios",
    ) -> None:
        self.private_key = private_key or ec.generate_private_key(ec.SECP256R1())
        self.name = name
        self.platform = platform
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
        operation: Operation,
        *,
        decision: Decision = Decision.APPROVE,
        user_verification: UserVerification = UserVerification.BIOMETRIC,
    ) -> DeviceAnswer:
        """Sign ``operation`` as shown, with the next counter value."""
        self.counter += 1
        registering = operation.kind is OperationKind.REGISTRATION
        payload = signed_payload(
            operation,
            device_id=operation.device_id,
            decision=decision,
            user_verification=user_verification,
            counter=self.counter,
            public_key=self.public_key if registering else None,
        )
        return DeviceAnswer(
            device_id=operation.device_id,
            decision=decision,
            user_verification=user_verification,
            counter=self.counter,
            signature=self.sign(payload),
            public_key=self.public_key if registering else None,
            device_name=self.name if registering else None,
            platform=self.platform if registering else None,
        )
