"""The relying party's users (``/api/v1/users``): create, find, read, change attributes,
lock, unlock, deactivate, delete.
"""

from __future__ import annotations

from uuid import UUID

from quart import Quart, request

from api.authenticators import authenticator_view
from api.routing import Auth, Call, Services, route
from engine.model import Device, User
from tapsign_sdk import wire
from tapsign_sdk.problems import InvalidInput


def user_view(user: User, devices: list[Device]) -> wire.User:
    return wire.User(
        user_id=user.id,
        username=user.username,
        status=user.status.value,
        created_at=user.created_at,
        updated_at=user.updated_at,
        last_login_date_success=user.last_login_at,
        last_login_date_failure=user.last_failed_login_at,
        attributes=user.attributes,
        authenticators=[authenticator_view(device) for device in devices],
    )


def register(app: Quart, services: Services) -> None:
    engine = services.engine
    identity = engine.identity

    # -- users and authenticators ---------------------------------------------------------

    async def full_user(user: User) -> wire.User:
        return user_view(user, await identity.list_devices(user.id))

    @route(
        app,
        services,
        "POST",
        "/api/v1/users",
        summary="Create a user",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        body=wire.CreateUser,
        response=wire.User,
        status=201,
    )
    async def create_user(call: Call, body: wire.CreateUser) -> wire.User:
        """A user without a device yet (status ``new``); 409 ``username-taken`` if taken."""
        user = await identity.create_user(body.username, body.attributes, actor=call.actor)
        return user_view(user, [])

    @route(
        app,
        services,
        "GET",
        "/api/v1/users",
        summary="Find a user by username",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        response=wire.User,
    )
    async def find_user(call: Call) -> wire.User:
        """``?username=…``; 404 ``user-not-found`` if there is none."""
        username = request.args.get("username")
        if not username:
            raise InvalidInput("give ?username=", field="username")
        return await full_user(await identity.find_user(username))

    @route(
        app,
        services,
        "GET",
        "/api/v1/users/{userId}",
        summary="Get a user",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        response=wire.User,
    )
    async def get_user(call: Call, user_id: UUID) -> wire.User:
        """The user with attributes and ``authenticators[]``."""
        return await full_user(await identity.get_user(user_id))

    @route(
        app,
        services,
        "PATCH",
        "/api/v1/users/{userId}/attributes",
        summary="Set and remove attributes",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        body=wire.UpdateAttributes,
        response=wire.User,
    )
    async def update_attributes(
        call: Call, body: wire.UpdateAttributes, user_id: UUID
    ) -> wire.User:
        """Sets the keys of ``set`` and removes those of ``remove``; at most 32 keys remain."""
        user = await identity.update_attributes(
            user_id, set_attributes=body.set, remove=body.remove, actor=call.actor
        )
        return await full_user(user)

    def user_action(action: str, summary: str, description: str) -> None:
        @route(
            app,
            services,
            "POST",
            f"/api/v1/users/{{userId}}/{action}",
            summary=summary,
            tag="users",
            auth=Auth.ACCESS_KEY,
            scope="users",
            response=wire.User,
        )
        async def change(call: Call, user_id: UUID) -> wire.User:
            if action == "lock":
                user = await identity.lock_user(user_id, actor=call.actor)
            elif action == "unlock":
                user = await identity.unlock_user(user_id, actor=call.actor)
            else:
                user = await engine.deactivate_user(user_id, actor=call.actor)
                for device in await identity.list_devices(user_id):
                    services.devices.forget(device.id)  # refused from the next request on
            return await full_user(user)

        change.__doc__ = description

    user_action("lock", "Lock a user", "A locked user cannot start or complete operations.")
    user_action("unlock", "Unlock a user", "Active again (``new`` if no device is enrolled).")
    user_action(
        "deactivate",
        "Deactivate a user (final)",
        "Final: every authenticator of the user is revoked at once (PSD2 RTS art. 27) and "
        "pending transactions are cancelled.",
    )

    @route(
        app,
        services,
        "DELETE",
        "/api/v1/users/{userId}",
        summary="Delete a user",
        tag="users",
        auth=Auth.ACCESS_KEY,
        scope="users",
        status=204,
    )
    async def delete_user(call: Call, user_id: UUID) -> None:
        """Deletes the user and its authenticators (204); the audit trail keeps its entries."""
        devices = await identity.list_devices(user_id)
        await engine.delete_user(user_id, actor=call.actor)
        for device in devices:
            services.devices.forget(device.id)
