"""Configuration: defaults, file, environment, and the PIN kept out of all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import load_settings
from hsm.errors import HsmPermanentError
from hsm.settings import HsmSettings, read_pin
from tapsign_sdk.problems import ConfigurationError


def test_defaults_are_the_embedded_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings({})
    assert settings.hsm.backend == "pkcs11"
    assert settings.hsm.token_label == "tapsign"
    assert settings.hsm.pin_file == "var/softhsm/user.pin"
    assert settings.verifier.backend == "openssl"
    assert settings.verifier.worker_count() >= 1


def test_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "tapsign.toml"
    config.write_text(
        '[hsm]\ntoken_label = "from-file"\nmax_sessions = 4\n[verifier]\nworkers = 3\n'
    )
    settings = load_settings(
        {"TAPSIGN_CONFIG": str(config), "TAPSIGN_VERIFIER_WORKERS": "5", "TAPSIGN_UNRELATED": "x"}
    )
    assert settings.hsm.token_label == "from-file"
    assert settings.hsm.max_sessions == 4
    assert settings.verifier.workers == 5


def test_a_pin_in_the_config_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    config = tmp_path / "tapsign.toml"
    config.write_text('[hsm]\npin = "s3cret-pin-value"\n')
    with pytest.raises(ConfigurationError) as raised:
        load_settings({}, str(config))
    assert (
        str(raised.value)
        == "invalid configuration: Object contains unknown field `pin` - at `$.hsm`"
    )
    assert "s3cret-pin-value" not in str(raised.value)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"TAPSIGN_VERIFIER_WORKERS": "many"},
            r"^invalid configuration: Expected `int`, got `str` - at `\$\.verifier\.workers`$",
        ),
        (
            {"TAPSIGN_VERIFIER_BACKEND": "gpu"},
            r"^invalid configuration: Invalid enum value 'gpu' - at `\$\.verifier\.backend`$",
        ),
        (
            {"TAPSIGN_HSM_MAX_SESSIONS": "0"},
            r"^invalid configuration: Expected `int` >= 1 - at `\$\.hsm\.max_sessions`$",
        ),
        (
            {"TAPSIGN_CONFIG": "/nonexistent/tapsign.toml"},
            r"^cannot read /nonexistent/tapsign\.toml",
        ),
    ],
)
def test_invalid_settings_name_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_settings(environ)


def test_invalid_toml(tmp_path: Path) -> None:
    config = tmp_path / "tapsign.toml"
    config.write_text("[hsm\n")
    with pytest.raises(ConfigurationError, match=r"tapsign\.toml is not valid TOML"):
        load_settings({}, str(config))


def test_pin_from_environment_first_then_file(tmp_path: Path) -> None:
    pin_file = tmp_path / "user.pin"
    pin_file.write_text("from-file\n")
    settings = HsmSettings(pin_file=str(pin_file))
    assert read_pin(settings, {"TAPSIGN_HSM_PIN": "from-env"}) == "from-env"
    assert read_pin(settings, {}) == "from-file"


@pytest.mark.parametrize(
    ("content", "pin_file", "message"),
    [
        (None, "missing.pin", r"^cannot read the HSM PIN file .*missing\.pin: No such file"),
        ("  \n", "empty.pin", r"^the HSM PIN file .*empty\.pin is empty$"),
        (None, None, r"^no HSM PIN: set TAPSIGN_HSM_PIN or hsm\.pin_file"),
    ],
)
def test_missing_pin(
    tmp_path: Path, content: str | None, pin_file: str | None, message: str
) -> None:
    path = None if pin_file is None else tmp_path / pin_file
    if path is not None and content is not None:
        path.write_text(content)
    with pytest.raises(HsmPermanentError, match=message):
        read_pin(HsmSettings(pin_file=None if path is None else str(path)), {})
