"""The relying party's authenticators (``/api/v1/authenticators``): read, lock, unlock,
delete.
"""

from __future__ import annotations

from uuid import UUID

from quart import Quart

from api.routing import Auth, Call, Services, route
from engine.model import Device
from tapsign_sdk import wire


def authenticator_view(device: Device) -> wire.Authenticator:
    return wire.Authenticator(
        authenticator_id=device.id,
        name=device.name,
        type=device.platform,
        state=device.status.value,
        enrolled_at=device.enrolled_at,
        updated_at=device.updated_at,
        last_used_at=device.last_used_at,
        failed_attempts=device.failed_attempts,
        attestation=device.attestation,
    )


def register(app: Quart, services: Services) -> None:
    identity = services.engine.identity

    @route(
        app,
        services,
        "GET",
        "/api/v1/authenticators/{authenticatorId}",
        summary="Get an authenticator",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        response=wire.Authenticator,
    )
    async def get_authenticator(call: Call, authenticator_id: UUID) -> wire.Authenticator:
        """A device: name, type (platform), state, times, consecutive failed attempts."""
        return authenticator_view(await identity.get_device(authenticator_id))

    def device_action(action: str, summary: str, description: str) -> None:
        @route(
            app,
            services,
            "POST",
            f"/api/v1/authenticators/{{authenticatorId}}/{action}",
            summary=summary,
            tag="users",
            auth=Auth.ACCESS_KEY,
            scope="users",
            response=wire.Authenticator,
        )
        async def change(call: Call, authenticator_id: UUID) -> wire.Authenticator:
            if action == "lock":
                device = await identity.lock_device(authenticator_id, actor=call.actor)
            else:
                device = await identity.unlock_device(authenticator_id, actor=call.actor)
            services.devices.forget(authenticator_id)
            return authenticator_view(device)

        change.__doc__ = description

    device_action("lock", "Lock an authenticator", "Its answers are refused until unlocked.")
    device_action(
        "unlock",
        "Unlock an authenticator",
        "Active again, with its count of failed attempts reset (PSD2 RTS art. 4(4)).",
    )

    @route(
        app,
        services,
        "DELETE",
        "/api/v1/authenticators/{authenticatorId}",
        summary="Revoke an authenticator",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        status=204,
    )
    async def delete_authenticator(call: Call, authenticator_id: UUID) -> None:
        """Revokes the authenticator at once and for good (PSD2 RTS art. 27): its
        signatures are refused from now on. The record stays, deactivated, for the audit."""
        await identity.deactivate_device(authenticator_id, actor=call.actor)
        services.devices.forget(authenticator_id)
