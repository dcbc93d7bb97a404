"""A real tapsign server for the end-to-end tests and the crash test: ``tapsign serve``
(Hypercorn, trio) on a loopback port, in a directory with its own SoftHSM2 token and SQLite
database, set up by the same script ``make`` uses."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from hsm.settings import default_module
from loadtests.run import free_port, launch
from tests.engine.conftest import POSTGRES_MISSING, POSTGRES_URL

ROOT = Path(__file__).resolve().parents[2]
TAPSIGN = Path(sys.executable).with_name("tapsign")


@dataclass(frozen=True)
class Server:
    url: str
    access_key: str
    directory: Path

    def tapsign(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own executable
            [str(TAPSIGN), *arguments],
            cwd=self.directory,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )


def environment() -> dict[str, str]:
    """This environment without tapsign's and SoftHSM2's variables: the server's directory
    and its tapsign.toml say everything."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TAPSIGN_", "SOFTHSM2_"))
    }


def prepare(directory: Path, *, config: str = "", callback_url: str | None = None) -> str:
    """A token, keys, database and access key in ``directory``, with ``config`` as its
    tapsign.toml; returns the access key."""
    if not Path(default_module()).is_file():
        pytest.skip("SoftHSM2 is not installed: run 'make test' to install it")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tapsign.toml").write_text(config)
    subprocess.run(  # noqa: S603 - our own script
        [str(ROOT / "softhsm-config" / "init-token.sh"), "var", str(TAPSIGN)],
        cwd=directory,
        env=environment(),
        check=True,
        capture_output=True,
        timeout=120,
    )
    command = [str(TAPSIGN), "keys", "create", "--name", "e2e", "--json"]
    if callback_url is not None:
        command += ["--callback-url", callback_url]
    created = subprocess.run(  # noqa: S603
        command, cwd=directory, env=environment(), check=True, capture_output=True, text=True
    )
    access_key: str = json.loads(created.stdout)["accessKey"]
    return access_key


def start(directory: Path, port: int, *, workers: int = 1) -> subprocess.Popen[bytes]:
    """``tapsign serve`` in ``directory`` on ``port``, once it is ready; its output, at
    INFO level, is appended to ``server.log`` there (tests/e2e/test_secrets.py reads it)."""
    command = [str(TAPSIGN), "--verbose", "serve", "--port", str(port), "--workers", str(workers)]
    return launch(command, directory, environment(), port)


@contextmanager
def serving(directory: Path, *, workers: int = 1, config: str = "") -> Iterator[Server]:
    """A server in ``directory`` for the duration of the block."""
    access_key = prepare(directory, config=config)
    port = free_port()
    process = start(directory, port, workers=workers)
    try:
        yield Server(url=f"http://127.0.0.1:{port}", access_key=access_key, directory=directory)
    finally:
        process.terminate()
        process.wait(timeout=30)


def database_config(url: str) -> str:
    """A tapsign.toml for a server on the database at ``url``, without rate limits (the load
    of these tests comes from one address, faster than a phone's)."""
    return (
        f'[database]\nurl = "{url}"\n[ratelimit]\naddress_per_second = 0\ndevice_per_second = 0\n'
    )


@contextmanager
def postgres_schema() -> Iterator[str]:
    """The URL of a fresh schema in the PostgreSQL test database, dropped afterwards; its
    connections carry the schema's name as their application name. Skips the test when
    PostgreSQL is not there."""
    if POSTGRES_MISSING:
        pytest.skip(POSTGRES_MISSING)
    schema = f"e2e_{secrets.token_hex(6)}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = sa.make_url(POSTGRES_URL).update_query_dict(
        {"options": f"-csearch_path={schema}", "application_name": schema}
    )
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
