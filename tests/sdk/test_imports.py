"""The SDK is a distribution of its own: importing it loads nothing of the server."""

from __future__ import annotations

import json
import subprocess
import sys

SERVER = ("engine", "api", "hsm", "loadtests", "sqlalchemy", "alembic", "pkcs11", "trio", "quart")


def test_importing_the_sdk_loads_no_server_module() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; import tapsign_sdk.client, tapsign_sdk.device; "
            "print(json.dumps(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = json.loads(loaded.stdout)
    assert "tapsign_sdk.device" in modules
    assert [name for name in modules if name.split(".")[0] in SERVER] == []
