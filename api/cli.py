"""The ``tapsign`` command.

``tapsign hsm init | keys | rotate PURPOSE | retire KID`` manage the HSM keys;
``tapsign db upgrade`` migrates the database; ``tapsign audit verify`` checks the audit
trail; ``tapsign bench verify | memory`` measure the verifier and the engine. PINs are read from the
environment or files, never from arguments, and never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from api.settings import Settings, load_settings
from engine.audit import verify_chain
from engine.benchmark import bench_memory
from engine.errors import TapsignError
from engine.store import Store, read_audit
from hsm.benchmark import bench_verify
from hsm.keyring import KeyPurpose, Keyring, open_keyring
from hsm.keystores import Pkcs11KeyStore
from hsm.pkcs11_token import initialise_token
from hsm.settings import read_pin
from hsm.verify_backends import make_verify_backend

SO_PIN_ENVIRONMENT_VARIABLE = "TAPSIGN_HSM_SO_PIN"


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
    with _keyring(settings) as keyring:
        report = bench_memory(keyring, count=arguments.operations)
    if arguments.json:
        sys.stdout.buffer.write(msgspec.json.format(msgspec.json.encode(report)) + b"\n")
        return
    print(
        f"{report.operations:,} pending operations: resident set {report.resident_before_mib} MiB"
        f" -> {report.resident_after_mib} MiB, {report.bytes_per_operation:,.0f} bytes each"
    )


def db_upgrade(settings: Settings, arguments: argparse.Namespace) -> None:
    store = Store(settings.database)
    try:
        store.migrate()
    finally:
        store.close()
    print(f"database {store.url.render_as_string(hide_password=True)} is at the newest schema")


def audit_verify(settings: Settings, arguments: argparse.Namespace) -> None:
    store = Store(settings.database)
    try:
        with store.transaction(write=False) as connection:
            entries, head_seq, head_hash = read_audit(connection)
    finally:
        store.close()
    problems = verify_chain(entries, head_seq=head_seq, head_hash=head_hash)
    for problem in problems:
        print(f"  {problem}")
    if problems:
        raise TapsignError(f"the audit trail is damaged: {len(problems)} problems")
    print(f"the audit trail is intact: {len(entries):,} entries")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tapsign", description=__doc__.splitlines()[0])
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
    memory = bench.add_parser("memory", help="resident memory per pending operation")
    memory.add_argument("--operations", type=int, default=100_000)
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
    audit.add_parser("verify", help="check the hash chain").set_defaults(handler=audit_verify)
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
