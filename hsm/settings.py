"""Settings of the key service and the batched verifier.

The PIN is deliberately not a field here: settings are printed, compared and logged,
a PIN never is. :func:`read_pin` fetches it from the environment or a file at the one
moment it is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from hsm.errors import HsmPermanentError

#: Where SoftHSM2 installs its module on Debian/Ubuntu and with Homebrew (arm64, x86_64).
SOFTHSM2_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

PIN_ENVIRONMENT_VARIABLE = "TAPSIGN_HSM_PIN"


def default_module() -> str:
    """The first SoftHSM2 module present on this machine, or the Debian path if none is."""
    return next((path for path in SOFTHSM2_MODULES if Path(path).exists()), SOFTHSM2_MODULES[0])


class HsmSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the keys live. ``backend = "software"`` must be chosen explicitly."""

    backend: Literal["pkcs11", "software"] = "pkcs11"
    #: Path of the PKCS#11 module (the vendor's ``.so``).
    module: str = msgspec.field(default_factory=default_module)
    #: Tokens move between slots (SoftHSM2 reassigns them), so they are found by label.
    token_label: str = "tapsign"  # noqa: S105 - a label, not a secret
    #: File holding the user PIN; ``TAPSIGN_HSM_PIN`` in the environment takes precedence.
    pin_file: str | None = "var/softhsm/user.pin"
    #: SoftHSM2 only: its configuration file, exported as ``SOFTHSM2_CONF`` unless the
    #: environment already sets that variable. Other modules ignore it.
    softhsm2_conf: str | None = "var/softhsm/softhsm2.conf"
    #: Upper bound of open PKCS#11 sessions (verifier workers and signers share them).
    max_sessions: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    #: Software backend only: directory of the encrypted private keys.
    software_key_dir: str = "var/software-keys"
    #: A running server reads the key list again this often, taking up rotations and
    #: retirements made by ``tapsign hsm`` without a restart.
    refresh_seconds: Annotated[float, msgspec.Meta(ge=0.5, le=300)] = 2.0


class VerifierSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The batched verifier: which backend, how many workers, how much queue."""

    backend: Literal["openssl", "pkcs11"] = "openssl"
    #: Worker threads; 0 means one per core.
    workers: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    #: Requests waiting beyond this are refused at once with ``Overloaded`` (HTTP 503).
    max_queue: Annotated[int, msgspec.Meta(ge=1)] = 2048
    #: The most signatures verified in one thread hop.
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 128
    #: Parsed public keys kept per process (OpenSSL) or per PKCS#11 session (token objects).
    key_cache: Annotated[int, msgspec.Meta(ge=0)] = 4096

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def read_pin(settings: HsmSettings, environ: Mapping[str, str]) -> str:
    """The user PIN (or the software backend's passphrase), from the environment or its file."""
    pin = environ.get(PIN_ENVIRONMENT_VARIABLE)
    if pin:
        return pin
    if settings.pin_file is None:
        raise HsmPermanentError(
            f"no HSM PIN: set {PIN_ENVIRONMENT_VARIABLE} or hsm.pin_file (TAPSIGN_HSM_PIN_FILE)"
        )
    try:
        pin = Path(settings.pin_file).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise HsmPermanentError(
            f"cannot read the HSM PIN file {settings.pin_file}: {exc.strerror}"
        ) from exc
    if not pin:
        raise HsmPermanentError(f"the HSM PIN file {settings.pin_file} is empty")
    return pin
