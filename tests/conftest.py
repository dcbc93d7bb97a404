"""Shared fixtures: a throwaway SoftHSM2 installation for the whole test session.

SoftHSM2 reads its configuration once per process, in ``C_Initialize``, so the session
points ``SOFTHSM2_CONF`` at a temporary directory before anything loads the module, and
each test that needs a token gets a fresh one in that directory (``new_token``), so that
no test sees another's keys.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hsm.pkcs11_token import Pkcs11Token, initialise_token
from hsm.settings import HsmSettings, default_module

SO_PIN = "test-so-pin-" + secrets.token_hex(4)
USER_PIN = "test-user-pin-" + secrets.token_hex(4)


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    module = default_module()
    if not Path(module).is_file():
        pytest.skip(f"SoftHSM2 is not installed ({module} missing): run 'make test' to install it")
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir(mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\n"
        "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
    )
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    yield conf
    if previous is None:
        del os.environ["SOFTHSM2_CONF"]
    else:
        os.environ["SOFTHSM2_CONF"] = previous


TokenFactory = Callable[..., Pkcs11Token]


@pytest.fixture
def new_token(softhsm_conf: Path) -> Iterator[TokenFactory]:
    """Make a freshly initialised, logged-in token; all are closed after the test."""
    made: list[Pkcs11Token] = []

    def make(*, max_sessions: int = 16) -> Pkcs11Token:
        label = f"test-{secrets.token_hex(6)}"
        initialise_token(module=default_module(), label=label, so_pin=SO_PIN, user_pin=USER_PIN)
        token = Pkcs11Token(
            module=default_module(), token_label=label, pin=USER_PIN, max_sessions=max_sessions
        )
        made.append(token)
        return token

    yield make
    for token in made:
        token.close()


@pytest.fixture
def token(new_token: TokenFactory) -> Pkcs11Token:
    return new_token()


@pytest.fixture
def hsm_settings(token: Pkcs11Token) -> HsmSettings:
    return HsmSettings(module=token.module_path, token_label=token.token_label, pin_file=None)
