"""The ``tapsign`` command and the token set-up script, run as a user runs them.

Each test works in a fresh directory with its own ``var/`` (so the defaults, relative to
the working directory, are what is exercised) and runs real processes: the SoftHSM2
module is initialised per process, so these do not share the test session's token.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest

from engine.audit import AuditEntry, entry_hash
from hsm.settings import default_module

ROOT = Path(__file__).resolve().parents[2]
TAPSIGN = Path(sys.executable).with_name("tapsign")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    if not Path(default_module()).is_file():
        pytest.skip("SoftHSM2 is not installed: run 'make test' to install it")
    if not TAPSIGN.exists():
        pytest.skip(f"the tapsign command is not installed at {TAPSIGN}")
    return tmp_path


def run(
    workdir: Path, *arguments: str, check: bool = True, environ: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TAPSIGN_", "SOFTHSM2_"))
    }
    env.update(environ or {})
    completed = subprocess.run(  # noqa: S603 - our own executables, fixed arguments
        arguments, cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if check and completed.returncode != 0:
        pytest.fail(f"{arguments} failed:\n{completed.stdout}\n{completed.stderr}")
    return completed


def set_up(workdir: Path) -> subprocess.CompletedProcess[str]:
    return run(workdir, str(ROOT / "softhsm-config" / "init-token.sh"), "var", str(TAPSIGN))


def kids(output: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for purpose, kid in re.findall(
        r"^  (\S+-(?:signing|encryption))\s+(\S+)\s", output, re.MULTILINE
    ):
        found.setdefault(purpose, []).append(kid)
    return found


def test_token_set_up_is_idempotent_and_keeps_secrets_private(workdir: Path) -> None:
    first = set_up(workdir)
    assert "initialised token 'tapsign'" in first.stdout
    assert first.stdout.count("created ") == 8  # "created <purpose> key" and "created <date>"
    assert first.stdout.count("[always_sensitive, never_extractable]") == 4
    softhsm = workdir / "var" / "softhsm"
    for name in ("user.pin", "so.pin"):
        assert stat.S_IMODE((softhsm / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((softhsm / "tokens").stat().st_mode) == 0o700
    user_pin = (softhsm / "user.pin").read_text()
    so_pin = (softhsm / "so.pin").read_text()

    second = set_up(workdir)
    assert "reusing token 'tapsign'" in second.stdout
    assert "created token-signing key" not in second.stdout
    assert kids(second.stdout) == kids(first.stdout)
    assert (softhsm / "user.pin").read_text() == user_pin

    for output in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert user_pin not in output
        assert so_pin not in output


def test_keys_rotate_and_retire(workdir: Path) -> None:
    set_up(workdir)
    listed = run(workdir, str(TAPSIGN), "hsm", "keys")
    before = kids(listed.stdout)
    assert sorted(before) == [
        "callback-signing",
        "consent-signing",
        "data-encryption",
        "token-signing",
    ]
    old = before["consent-signing"][0]

    rotated = run(workdir, str(TAPSIGN), "hsm", "rotate", "consent-signing")
    new = kids(rotated.stdout)["consent-signing"]
    assert new[1] == old
    assert new[0] != old
    assert f"rotated consent-signing: {new[0]} is now active" in rotated.stdout

    refused = run(workdir, str(TAPSIGN), "hsm", "retire", new[0], check=False)
    assert refused.returncode == 1
    assert refused.stderr == (
        f"tapsign: {new[0]} is the active consent-signing key: rotate first, then retire it\n"
    )
    retired = run(workdir, str(TAPSIGN), "hsm", "retire", old)
    assert f"retired consent-signing key {old}" in retired.stdout
    assert kids(run(workdir, str(TAPSIGN), "hsm", "keys").stdout)["consent-signing"] == [new[0]]


def test_wrong_pin_and_bad_configuration_fail_cleanly(workdir: Path) -> None:
    set_up(workdir)
    wrong = run(
        workdir, str(TAPSIGN), "hsm", "keys", check=False, environ={"TAPSIGN_HSM_PIN": "Zq9-wrong"}
    )
    assert wrong.returncode == 1
    assert wrong.stderr == "tapsign: HSM login refused: the configured PIN is wrong\n"
    assert "Zq9-wrong" not in wrong.stdout + wrong.stderr

    bad = run(
        workdir, str(TAPSIGN), "hsm", "keys", check=False, environ={"TAPSIGN_HSM_MAX_SESSIONS": "x"}
    )
    assert bad.returncode == 1
    assert "Expected `int`, got `str` - at `$.hsm.max_sessions`" in bad.stderr


def test_software_backend_only_when_asked(workdir: Path) -> None:
    environ = {"TAPSIGN_HSM_BACKEND": "software", "TAPSIGN_HSM_PIN": "a long passphrase"}
    created = run(workdir, str(TAPSIGN), "hsm", "init", environ=environ)
    assert "backend: software" in created.stdout
    assert "not in an HSM" in created.stderr
    assert len(list((workdir / "var" / "software-keys").iterdir())) == 4


@pytest.mark.parametrize("backend", ["openssl", "pkcs11"])
def test_bench_verify_reports_throughput_ceiling_and_ratio(workdir: Path, backend: str) -> None:
    if backend == "openssl" and shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    set_up(workdir)
    completed = run(
        workdir, str(TAPSIGN), "bench", "verify", "--backend", backend, "--seconds", "1", "--json"
    )
    report = json.loads(completed.stdout)
    assert report["backend"] == backend
    assert report["verifications"] > 0
    assert report["ceiling_per_second"] > 0
    assert report["ratio"] == pytest.approx(
        report["verifier_per_second"] / report["ceiling_per_second"], abs=0.002
    )
    # One signature in eight of the workload is wrong; the verifier must have said so.
    assert report["statistics"]["failed"] > 0
    assert report["statistics"]["errors"] == 0

    text = run(workdir, str(TAPSIGN), "bench", "verify", "--backend", backend, "--seconds", "1")
    assert re.search(r"^ratio:    \d\.\d{3}$", text.stdout, re.MULTILINE)


def test_database_upgrade_and_audit_verification(workdir: Path) -> None:
    first = run(workdir, str(TAPSIGN), "db", "upgrade")
    assert first.stdout == "database sqlite:///var/tapsign.db is at the newest schema\n"
    run(workdir, str(TAPSIGN), "db", "upgrade")  # idempotent
    database = workdir / "var" / "tapsign.db"
    with sqlite3.connect(database) as connection:
        connection.execute(
            "insert into audit_log values (1, '2026-01-01 00:00:00', 'admin', 'user.created',"
            " null, null, null, 'ok', null, zeroblob(32), zeroblob(32))"
        )
        connection.execute("update audit_head set seq = 1, hash = zeroblob(32)")
    damaged = run(workdir, str(TAPSIGN), "audit", "verify", check=False)
    assert damaged.returncode == 1
    assert damaged.stdout == "  entry 1 was altered\n"
    assert damaged.stderr == "tapsign: the audit trail is damaged: 1 problems\n"


def test_bench_memory_reports_bytes_per_pending_operation(workdir: Path) -> None:
    """Both figures: approvals started through a server's API, and operations resumed."""
    set_up(workdir)
    reports = json.loads(
        run(
            workdir, str(TAPSIGN), "bench", "memory", "--operations", "300", "--resumed", "--json"
        ).stdout
    )
    assert [report["path"] for report in reports] == ["api", "resumed"]
    for report in reports:
        assert report["operations"] == 300
        assert report["bytes_per_operation"] == pytest.approx(
            (report["resident_after_mib"] - report["resident_before_mib"]) * 2**20 / 300,
            abs=0.05 * 2**20 / 300 * 2 + 1,
        )


def test_signed_checkpoints_find_a_rewrite_of_the_whole_trail(workdir: Path) -> None:
    """Checklist item 16: whoever rewrites every entry and the head keeps the chain
    consistent, but not the checkpoints signed in the HSM before."""
    set_up(workdir)
    run(workdir, str(TAPSIGN), "keys", "create", "--name", "first")  # audit entry 1
    checkpoints = workdir / "checkpoints.jwt"
    checkpoints.write_text(run(workdir, str(TAPSIGN), "audit", "checkpoint").stdout)
    run(workdir, str(TAPSIGN), "keys", "create", "--name", "second")  # entry 2
    with checkpoints.open("a") as kept:
        kept.write(run(workdir, str(TAPSIGN), "audit", "checkpoint").stdout)
    intact = run(workdir, str(TAPSIGN), "audit", "verify", "--checkpoints", str(checkpoints))
    assert intact.stdout == (
        "the audit trail is intact: 2 entries, and agrees with 2 signed checkpoints\n"
    )
    # Rewrite history consistently: entry 1 names someone else, every hash recomputed.
    database = workdir / "var" / "tapsign.db"
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "select seq, at, actor, action, operation_id, user_id, device_id, outcome, reason"
            " from audit_log order by seq"
        ).fetchall()
        previous = bytes(32)
        for seq, at, actor, action, operation, user, device, outcome, reason in rows:
            entry = AuditEntry(
                seq=seq,
                at=datetime.fromisoformat(at).replace(tzinfo=UTC),
                actor="someone else" if seq == 1 else actor,
                action=action,
                operation_id=operation and UUID(operation),
                user_id=user and UUID(user),
                device_id=device and UUID(device),
                outcome=outcome,
                reason=reason,
            )
            digest = entry_hash(entry, previous)
            connection.execute(
                "update audit_log set actor = ?, prev_hash = ?, hash = ? where seq = ?",
                (entry.actor, previous, digest, seq),
            )
            previous = digest
        connection.execute("update audit_head set hash = ?", (previous,))
    assert run(workdir, str(TAPSIGN), "audit", "verify").stdout.startswith(
        "the audit trail is intact"
    )
    found = run(
        workdir, str(TAPSIGN), "audit", "verify", "--checkpoints", str(checkpoints), check=False
    )
    assert found.returncode == 1
    assert found.stdout == (
        "  checkpoint 1: entry 1 differs from its signed checkpoint\n"
        "  checkpoint 2: entry 2 differs from its signed checkpoint\n"
    )
    # A checkpoint edited to match the forgery no longer verifies.
    header, claims, signature = checkpoints.read_text().split()[0].split(".")
    forged = json.loads(base64.urlsafe_b64decode(claims + "=="))
    forged["hash"] = previous.hex()
    forged_claims = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    checkpoints.write_text(f"{header}.{forged_claims}.{signature}\n")
    refused = run(
        workdir, str(TAPSIGN), "audit", "verify", "--checkpoints", str(checkpoints), check=False
    )
    assert refused.stdout.startswith("  checkpoint 1 is not validly signed (InvalidSignatureError")
