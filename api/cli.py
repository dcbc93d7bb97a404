"""The ``tapsign`` command.

``tapsign hsm init | keys | rotate PURPOSE | retire KID`` manage the HSM keys;
``tapsign db upgrade`` migrates the database; ``tapsign audit verify`` checks the audit
trail; ``tapsign bench verify | memory`` measure the verifier and the engine. PINs are read from the
environment or files, never from arguments, and never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import httpx
import msgspec
import trio
from hypercorn.run import run as hypercorn_run

from api.access import SCOPES, AccessKeys
from api.benchmark import bench_memory_api
from api.demo import DemoFailed, run_demo
from api.server import answers, hypercorn_config, local_server, serve
from api.settings import Settings, load_settings
from engine.audit import CHECKPOINT_AUDIENCE, AuditEntry, verify_chain, verify_checkpoint
from engine.benchmark import bench_memory
from engine.identity import Identity
from engine.model import Device, User, utc_now
from engine.peers import announce_records_to, announce_to
from engine.service import end_user
from engine.statements import AccessKeyRecord, read_audit
from engine.store import Store
from hsm.benchmark import bench_verify
from hsm.errors import InvalidToken
from hsm.keyring import KeyPurpose, Keyring, open_keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.pkcs11_token import initialise_token
from hsm.settings import read_pin
from hsm.tokens import TokenSigner
from hsm.verify_backends import make_verify_backend
from tapsign_sdk.client import ApiError
from tapsign_sdk.problems import TapsignError

SO_PIN_ENVIRONMENT_VARIABLE = "TAPSIGN_HSM_SO_PIN"
T = TypeVar("T")


def _keyring(settings: Settings) -> Keyring:
    return open_keyring(settings.hsm, pin=read_pin(settings.hsm, os.environ))


def _print_keys(keyring: Keyring) -> None:
    print(f"backend: {keyring.backend}")
    store = keyring.store
    for key in keyring.published():
        state = "active" if key.active else "verify-only"
        created = f"{key.created:%Y-%m-%d %H:%M}Z"
        line = f"  {key.purpose.value:<17} {key.kid}  {state:<11} created {created}"
        if isinstance(store, Pkcs11KeyStore):
            attributes = store.private_key_attributes(key.kid)
            flags = [
                name.lower()
                for name in ("ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE")
                if attributes[name]
            ]
            line += f"  [{', '.join(flags) or 'EXTRACTABLE OR NOT SENSITIVE'}]"
        print(line)
    if not keyring.published():
        print("  (no keys: run 'tapsign hsm init')")


def hsm_init(settings: Settings, arguments: argparse.Namespace) -> None:
    if arguments.create_token:
        if settings.hsm.backend != "pkcs11":
            raise TapsignError("--create-token applies to the pkcs11 backend only")
        so_pin = os.environ.get(SO_PIN_ENVIRONMENT_VARIABLE)
        if not so_pin and arguments.so_pin_file:
            so_pin = Path(arguments.so_pin_file).read_text(encoding="utf-8").strip()
        if not so_pin:
            raise TapsignError(
                f"--create-token needs {SO_PIN_ENVIRONMENT_VARIABLE} or --so-pin-file"
            )
        created = initialise_token(
            module=settings.hsm.module,
            label=settings.hsm.token_label,
            so_pin=so_pin,
            user_pin=read_pin(settings.hsm, os.environ),
            softhsm2_conf=settings.hsm.softhsm2_conf,
        )
        verb = "initialised" if created else "reusing"
        print(f"{verb} token {settings.hsm.token_label!r} ({settings.hsm.module})")
    with _keyring(settings) as keyring:
        for key in keyring.ensure():
            print(f"created {key.purpose.value} key {key.kid}")
        _print_keys(keyring)


def hsm_keys(settings: Settings, arguments: argparse.Namespace) -> None:
    with _keyring(settings) as keyring:
        _print_keys(keyring)


def hsm_rotate(settings: Settings, arguments: argparse.Namespace) -> None:
    with _keyring(settings) as keyring:
        key = keyring.rotate(KeyPurpose(arguments.purpose))
        print(f"rotated {key.purpose.value}: {key.kid} is now active")
        _print_keys(keyring)


def hsm_retire(settings: Settings, arguments: argparse.Namespace) -> None:
    with _keyring(settings) as keyring:
        key = keyring.retire(arguments.kid)
        print(f"retired {key.purpose.value} key {key.kid}: destroyed and no longer published")


def bench_verify_command(settings: Settings, arguments: argparse.Namespace) -> None:
    verifier_settings = msgspec.structs.replace(settings.verifier, backend=arguments.backend)
    with contextlib.ExitStack() as stack:
        keyring = stack.enter_context(_keyring(settings)) if arguments.backend == "pkcs11" else None
        store = keyring.store if keyring is not None else None
        report = bench_verify(
            make_verify_backend(verifier_settings, keyring),
            verifier_settings,
            token=store.token if isinstance(store, Pkcs11KeyStore) else None,
            seconds=arguments.seconds,
            concurrency=arguments.concurrency,
        )
    if arguments.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
        return
    stats = report.statistics
    print(f"machine:  {report.machine}")
    print(
        f"verifier: {report.verifier_per_second:,.0f} verify/s  ({report.backend} backend, "
        f"{report.workers} workers, {report.concurrency} concurrent callers, "
        f"{report.verifications:,} in {report.seconds:.1f} s, mean batch {stats.mean_batch:.1f}, "
        f"largest {stats.largest_batch})"
    )
    print(f"ceiling:  {report.ceiling_per_second:,.0f} verify/s  ({report.ceiling})")
    print(f"ratio:    {report.ratio:.3f}")


def bench_memory_command(settings: Settings, arguments: argparse.Namespace) -> None:
    reports = [bench_memory_api(settings, count=arguments.operations, config=arguments.config)]
    if arguments.resumed:
        with _keyring(settings) as keyring:
            reports.append(bench_memory(keyring, count=arguments.operations))
    if arguments.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(reports)) + b"\n")
        return
    how = {"api": "started through the API", "resumed": "resumed from the database"}
    for report in reports:
        print(
            f"{report.operations:,} pending operations {how[report.path]}: resident set "
            f"{report.resident_before_mib} MiB -> {report.resident_after_mib} MiB, "
            f"{report.bytes_per_operation:,.0f} bytes each"
        )


def db_upgrade(settings: Settings, arguments: argparse.Namespace) -> None:
    store = Store(settings.database)
    try:
        store.migrate()
    finally:
        store.close()
    print(f"database {store.url.render_as_string(hide_password=True)} is at the newest schema")


def _read_audit(settings: Settings) -> tuple[list[AuditEntry], int, bytes]:
    store = Store(settings.database)
    try:
        with store.transaction(write=False) as connection:
            return read_audit(connection)
    finally:
        store.close()


def _checkpoints(keyring: Keyring, settings: Settings) -> TokenSigner:
    return TokenSigner(keyring, KeyPurpose.TOKEN, issuer=settings.server.base_url())


def audit_checkpoint(settings: Settings, arguments: argparse.Namespace) -> None:
    """Print the head of the trail signed in the HSM (a JWT), for safekeeping elsewhere."""
    _, head_seq, head_hash = _read_audit(settings)
    with _keyring(settings) as keyring:
        token = _checkpoints(keyring, settings).encode(
            {
                "aud": CHECKPOINT_AUDIENCE,
                "sub": "audit-trail",
                "iat": int(utc_now().timestamp()),
                "seq": head_seq,
                "hash": head_hash.hex(),
            },
            token_type="audit-checkpoint+jwt",  # noqa: S106 - a JWT "typ", not a secret
        )
    print(token)


def audit_verify(settings: Settings, arguments: argparse.Namespace) -> None:
    entries, head_seq, head_hash = _read_audit(settings)
    problems = verify_chain(entries, head_seq=head_seq, head_hash=head_hash)
    checked = 0
    if arguments.checkpoints is not None:
        lines = Path(arguments.checkpoints).read_text(encoding="utf-8").split()
        with _keyring(settings) as keyring:
            signer = _checkpoints(keyring, settings)
            for number, line in enumerate(lines, start=1):
                try:
                    claims = signer.decode(line, audience=CHECKPOINT_AUDIENCE, required=("iat",))
                except InvalidToken as exc:
                    problems.append(f"checkpoint {number} is not validly signed ({exc.reason})")
                    continue
                problem = verify_checkpoint(
                    entries, seq=int(claims["seq"]), hash=bytes.fromhex(str(claims["hash"]))
                )
                if problem is not None:
                    problems.append(f"checkpoint {number}: {problem}")
                checked += 1
    for problem in problems:
        print(f"  {problem}")
    if problems:
        raise TapsignError(f"the audit trail is damaged: {len(problems)} problems")
    against = f", and agrees with {checked} signed checkpoints" if checked else ""
    print(f"the audit trail is intact: {len(entries):,} entries{against}")


def serve_command(settings: Settings, arguments: argparse.Namespace) -> None:
    server = msgspec.structs.replace(
        settings.server,
        host=arguments.host or settings.server.host,
        port=settings.server.port if arguments.port is None else arguments.port,
        workers=arguments.workers or settings.server.workers,
    )
    settings = msgspec.structs.replace(settings, server=server)
    processes = server.process_count()
    print(f"tapsign serving on {server.base_url()} ({processes} worker(s)); Ctrl+C stops")
    if processes == 1:
        trio.run(serve, settings)
        return
    # Several processes: each imports api.asgi, which reads the same configuration, so the
    # command-line values travel in the environment.
    os.environ["TAPSIGN_SERVER_HOST"] = server.host
    os.environ["TAPSIGN_SERVER_PORT"] = str(server.port)
    config = hypercorn_config(settings)
    config.application_path = "api.asgi:app"
    hypercorn_run(config)


def _with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``work`` on a migrated store, outside any server (operator commands)."""

    async def run() -> T:
        store = Store(settings.database)
        try:
            await trio.to_thread.run_sync(store.migrate)
            return await work(store)
        finally:
            store.close()

    return trio.run(run)


def keys_create(settings: Settings, arguments: argparse.Namespace) -> None:
    async def create(store: Store) -> tuple[AccessKeyRecord, str] | None:
        keys = AccessKeys(store, clock=utc_now)
        if arguments.if_none and any(key.revoked_at is None for key in await keys.list()):
            return None
        return await keys.create(
            name=arguments.name,
            scopes=arguments.scope or sorted(SCOPES),
            callback_url=arguments.callback_url,
            callbacks=settings.callbacks,
            possession_only=arguments.possession_only,
        )

    created = _with_store(settings, create)
    if created is None:
        print("an access key exists already; 'tapsign keys create' makes another")
        return
    record, key = created
    if arguments.json:
        document = {"keyId": record.id, "accessKey": key, "scopes": sorted(record.scopes)}
        print(json.dumps(document))
        return
    base = settings.server.base_url()
    print(f"access key {record.id} ({', '.join(sorted(record.scopes))}), shown this once:")
    print(f"  {key}")
    print("try it:")
    print(f"  curl -s {base}/api/v1/users/enroll -H 'Authorization: Bearer {key}' \\")
    print("       -H 'Content-Type: application/json' -d '{\"username\": \"u12345\"}'")
    print(f"  .venv/bin/tapsign demo --url {base} --access-key {key}")


def keys_list(settings: Settings, arguments: argparse.Namespace) -> None:
    async def listing(store: Store) -> list[AccessKeyRecord]:
        return await AccessKeys(store, clock=utc_now).list()

    for key in _with_store(settings, listing):
        state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
        extra = "  possession-only" if key.possession_only else ""
        print(f"{key.id}  {key.name:<20} {' '.join(sorted(key.scopes)):<27} {state}{extra}")


def keys_revoke(settings: Settings, arguments: argparse.Namespace) -> None:
    async def revoke(store: Store) -> None:
        await AccessKeys(store, clock=utc_now).revoke(arguments.key_id)

    _with_store(settings, revoke)
    announce_records_to(settings.server.peers_dir)  # a running server forgets it at once
    print(f"access key {arguments.key_id} revoked")


def users_command(settings: Settings, arguments: argparse.Namespace) -> None:
    async def act(store: Store) -> tuple[User, list[Device]] | None:
        identity = Identity(store)
        target = arguments.user
        try:
            user = await identity.get_user(UUID(target))
        except ValueError:
            user = await identity.find_user(target)
        action = arguments.action
        if action == "lock":
            user = await identity.lock_user(user.id, actor="admin")
        elif action == "unlock":
            user = await identity.unlock_user(user.id, actor="admin")
        elif action in ("deactivate", "delete"):
            # What the user had pending is cancelled with it; a running server hears of it
            # at once and delivers the callbacks (engine/service.py end_user).
            ended, cancelled = await end_user(
                store, user.id, delete=action == "delete", actor="admin", clock=utc_now, lease=None
            )
            announce_to(
                settings.server.peers_dir,
                [(operation.id, operation.version) for operation, _ in cancelled],
            )
            if ended is None:
                return None
            user = ended
        return user, await identity.list_devices(user.id)

    shown = _with_store(settings, act)
    if arguments.action != "show":  # a running server forgets what it cached of the user
        announce_records_to(settings.server.peers_dir)
    if shown is None:
        print(f"user {arguments.user} deleted (the audit trail keeps its entries)")
        return
    user, devices = shown
    created = f"{user.created_at:%Y-%m-%d %H:%M}Z"
    print(f"{user.id}  {user.username}  {user.status.value}  created {created}")
    for device in devices:
        print(f"  authenticator {device.id}  {_device_facts(device)}")


def _device_facts(device: Device) -> str:
    return (
        f"{device.name} ({device.platform})  {device.status.value}  "
        f"failed attempts {device.failed_attempts}  attestation {device.attestation or 'none'}"
    )


def devices_command(settings: Settings, arguments: argparse.Namespace) -> None:
    async def act(store: Store) -> Device:
        identity = Identity(store)
        device_id = UUID(arguments.device)
        action = arguments.action
        if action == "lock":
            return await identity.lock_device(device_id, actor="admin")
        if action == "unlock":
            return await identity.unlock_device(device_id, actor="admin")
        if action == "deactivate":
            return await identity.deactivate_device(device_id, actor="admin")
        return await identity.get_device(device_id)

    device = _with_store(settings, act)
    if arguments.action != "show":  # a running server forgets what it cached of the device
        announce_records_to(settings.server.peers_dir)
    print(f"{device.id}  user {device.user_id}  {_device_facts(device)}")


def demo_command(settings: Settings, arguments: argparse.Namespace) -> None:
    access_key = arguments.access_key
    if access_key is None:

        async def create(store: Store) -> str:
            _, key = await AccessKeys(store, clock=utc_now).create(
                name="demo", callbacks=settings.callbacks
            )
            return key

        access_key = _with_store(settings, create)
    url = arguments.url or settings.server.base_url()
    with contextlib.ExitStack() as stack:
        if arguments.url is None and not answers(url):
            print("no server at the configured URL: starting one on a free loopback port")
            _, url = stack.enter_context(local_server("demo"))
        try:
            run_demo(url, access_key)
        except (DemoFailed, ApiError) as exc:
            raise TapsignError(f"the demo failed: {exc}") from exc
        except httpx.TransportError as exc:
            raise TapsignError(f"no tapsign server answers at {url}: {exc}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapsign",
        description="tapsign: the server, its keys in the HSM, access keys, users and devices, "
        "the database, the audit trail, benchmarks and a demo.",
    )
    parser.add_argument(
        "--config", help="TOML configuration file (default: $TAPSIGN_CONFIG or ./tapsign.toml)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    hsm = commands.add_parser("hsm", help="manage tapsign's keys in the HSM").add_subparsers(
        dest="hsm_command", required=True
    )
    init = hsm.add_parser("init", help="create the missing keys (idempotent)")
    init.add_argument(
        "--create-token",
        action="store_true",
        help=f"first initialise the token in a free slot if it does not exist "
        f"(SO PIN from ${SO_PIN_ENVIRONMENT_VARIABLE} or --so-pin-file)",
    )
    init.add_argument("--so-pin-file", help="file holding the security officer PIN")
    init.set_defaults(handler=hsm_init)
    hsm.add_parser("keys", help="list the keys, active and verify-only").set_defaults(
        handler=hsm_keys
    )
    rotate = hsm.add_parser("rotate", help="create a new active key for a purpose")
    rotate.add_argument("purpose", choices=[purpose.value for purpose in KeyPurpose])
    rotate.set_defaults(handler=hsm_rotate)
    retire = hsm.add_parser("retire", help="destroy a key that is no longer active")
    retire.add_argument("kid")
    retire.set_defaults(handler=hsm_retire)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    verify = bench.add_parser("verify", help="batched verifier throughput against its ceiling")
    verify.add_argument("--backend", choices=["openssl", "pkcs11"], default="openssl")
    verify.add_argument("--seconds", type=int, default=5, help="length of each measurement")
    verify.add_argument("--concurrency", type=int, default=512, help="concurrent callers")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=bench_verify_command)
    memory = bench.add_parser(
        "memory", help="resident memory per pending operation started through the API"
    )
    memory.add_argument("--operations", type=int, default=10_000)
    memory.add_argument(
        "--resumed",
        action="store_true",
        help="also per operation resumed from the database by an engine alone",
    )
    memory.add_argument("--json", action="store_true", help="print the report as JSON")
    memory.set_defaults(handler=bench_memory_command)

    database = commands.add_parser("db", help="the database").add_subparsers(
        dest="db_command", required=True
    )
    database.add_parser("upgrade", help="create or upgrade the schema (idempotent)").set_defaults(
        handler=db_upgrade
    )
    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True
    )
    verify_audit = audit.add_parser("verify", help="check the hash chain")
    verify_audit.add_argument(
        "--checkpoints", help="a file of signed checkpoints (one per line) to check against"
    )
    verify_audit.set_defaults(handler=audit_verify)
    audit.add_parser(
        "checkpoint", help="print the head of the trail signed in the HSM, to keep elsewhere"
    ).set_defaults(handler=audit_checkpoint)

    server = commands.add_parser("serve", help="run the HTTP server (Hypercorn, trio)")
    server.add_argument("--host", help="bind address (default 127.0.0.1)")
    server.add_argument("--port", type=int, help="port (default 8080)")
    server.add_argument(
        "--workers", type=int, help="worker processes (default: [server] workers; 0: one per core)"
    )
    server.set_defaults(handler=serve_command)

    keys = commands.add_parser("keys", help="relying-party access keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create an access key (shown once)")
    create.add_argument("--name", default="relying party")
    create.add_argument("--scope", action="append", choices=sorted(SCOPES), help="repeatable")
    create.add_argument("--callback-url", help="callbacks of this key's transactions go here")
    create.add_argument(
        "--possession-only",
        action="store_true",
        help="may start authentications without user verification (possession only)",
    )
    create.add_argument("--if-none", action="store_true", help="only if no active key exists")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=keys_create)
    keys.add_parser("list", help="list access keys").set_defaults(handler=keys_list)
    revoke = keys.add_parser("revoke", help="revoke an access key")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=keys_revoke)

    users = commands.add_parser("users", help="users, for operators")
    users.add_argument("action", choices=["show", "lock", "unlock", "deactivate", "delete"])
    users.add_argument("user", help="user id or username")
    users.set_defaults(handler=users_command)
    devices = commands.add_parser("devices", help="authenticators, for operators")
    devices.add_argument("action", choices=["show", "lock", "unlock", "deactivate"])
    devices.add_argument("device", help="authenticator id")
    devices.set_defaults(handler=devices_command)

    demo = commands.add_parser("demo", help="every flow against a running server")
    demo.add_argument(
        "--url", help="server URL (default: this configuration's, or one the demo starts)"
    )
    demo.add_argument("--access-key", help="default: a new key made in the local database")
    demo.set_defaults(handler=demo_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if arguments.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings(config_file=arguments.config)
        arguments.handler(settings, arguments)
    except TapsignError as exc:
        print(f"tapsign: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
