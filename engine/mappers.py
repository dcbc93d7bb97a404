"""Rows to records and back: how users, devices and operations are stored (the columns of
engine/schema.py) and read (UTC datetimes, enums and bytes restored). No SQL runs here."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from engine.model import (
    Device,
    DeviceStatus,
    FailureReason,
    Operation,
    Payee,
    Payment,
    Phase,
    User,
    UserStatus,
)
from tapsign_sdk.model import Decision, OperationKind, UserVerification


def utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything tapsign stores is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def required_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# -- users ------------------------------------------------------------------------------


def user_of(row: sa.Row[Any]) -> User:
    return User(
        id=row.id,
        username=row.username,
        status=UserStatus(row.status),
        attributes=dict(row.attributes),
        created_at=required_utc(row.created_at),
        updated_at=required_utc(row.updated_at),
        last_login_at=utc(row.last_login_at),
        last_failed_login_at=utc(row.last_failed_login_at),
    )


def user_values(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "status": user.status.value,
        "attributes": user.attributes,
        "created_at": user.created_at,
        "updated_at": user.updated_at,
        "last_login_at": user.last_login_at,
        "last_failed_login_at": user.last_failed_login_at,
    }


# -- devices ----------------------------------------------------------------------------


def device_of(row: sa.Row[Any]) -> Device:
    return Device(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        platform=row.platform,
        public_key=bytes(row.public_key),
        status=DeviceStatus(row.status),
        enrolled_at=required_utc(row.enrolled_at),
        updated_at=required_utc(row.updated_at),
        last_used_at=utc(row.last_used_at),
        counter=row.counter,
        failed_attempts=row.failed_attempts,
        attestation=row.attestation,
    )


def device_values(device: Device) -> dict[str, Any]:
    return {
        "id": device.id,
        "user_id": device.user_id,
        "name": device.name,
        "platform": device.platform,
        "public_key": device.public_key,
        "status": device.status.value,
        "enrolled_at": device.enrolled_at,
        "updated_at": device.updated_at,
        "last_used_at": device.last_used_at,
        "counter": device.counter,
        "failed_attempts": device.failed_attempts,
        "attestation": device.attestation,
    }


# -- operations -------------------------------------------------------------------------


def operation_of(row: sa.Row[Any]) -> Operation:
    payment = None
    if row.amount is not None:
        payment = Payment(
            amount=row.amount,
            currency=row.currency,
            payee=Payee(name=row.payee_name, account=row.payee_account),
        )
    return Operation(
        id=row.id,
        kind=OperationKind(row.kind),
        user_id=row.user_id,
        device_id=row.device_id,
        client_id=row.client_id,
        phase=Phase(row.phase),
        version=row.version,
        challenge=bytes(row.challenge),
        created_at=required_utc(row.created_at),
        updated_at=required_utc(row.updated_at),
        expires_at=required_utc(row.expires_at),
        completed_at=utc(row.completed_at),
        message=row.message,
        payment=payment,
        text=row.text,
        pre_context=row.pre_context,
        post_context_sealed=None
        if row.post_context_sealed is None
        else bytes(row.post_context_sealed),
        require_user_verification=row.require_user_verification,
        callback_url=row.callback_url,
        device_name=row.device_name,
        device_platform=row.device_platform,
        public_key=None if row.public_key is None else bytes(row.public_key),
        decision=None if row.decision is None else Decision(row.decision),
        user_verification=(
            None if row.user_verification is None else UserVerification(row.user_verification)
        ),
        counter=row.counter,
        device_signature=None if row.device_signature is None else bytes(row.device_signature),
        failure_reason=None if row.failure_reason is None else FailureReason(row.failure_reason),
        result=row.result,
        result_token=row.result_token,
    )


def operation_values(operation: Operation) -> dict[str, Any]:
    payment = operation.payment
    return {
        "id": operation.id,
        "kind": operation.kind.value,
        "user_id": operation.user_id,
        "device_id": operation.device_id,
        "client_id": operation.client_id,
        "phase": operation.phase.value,
        "version": operation.version,
        "challenge": operation.challenge,
        "created_at": operation.created_at,
        "updated_at": operation.updated_at,
        "expires_at": operation.expires_at,
        "completed_at": operation.completed_at,
        "message": operation.message,
        "amount": None if payment is None else payment.amount,
        "currency": None if payment is None else payment.currency,
        "payee_name": None if payment is None else payment.payee.name,
        "payee_account": None if payment is None else payment.payee.account,
        "text": operation.text,
        "pre_context": operation.pre_context,
        "post_context_sealed": operation.post_context_sealed,
        "require_user_verification": operation.require_user_verification,
        "callback_url": operation.callback_url,
        "device_name": operation.device_name,
        "device_platform": operation.device_platform,
        "public_key": operation.public_key,
        "decision": None if operation.decision is None else operation.decision.value,
        "user_verification": (
            None if operation.user_verification is None else operation.user_verification.value
        ),
        "counter": operation.counter,
        "device_signature": operation.device_signature,
        "failure_reason": (
            None if operation.failure_reason is None else operation.failure_reason.value
        ),
        "result": operation.result,
        "result_token": operation.result_token,
    }
