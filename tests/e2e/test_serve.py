"""``tapsign serve`` as an operator runs it: started, then stopped with Ctrl+C."""

from __future__ import annotations

import signal
from pathlib import Path

from loadtests.run import free_port
from tests.e2e.serving import prepare, start


def test_ctrl_c_stops_every_worker_quietly(tmp_path: Path) -> None:
    directory = tmp_path / "server"
    prepare(directory)
    server = start(directory, free_port(), workers=2)
    server.send_signal(signal.SIGINT)
    assert server.wait(timeout=30) == 0
    log = (directory / "server.log").read_text()
    # Once, each worker printed "AttributeError: '_OsLockingLib' object has no attribute
    # 'unload'" from the PKCS#11 module's deallocation at exit.
    assert "Traceback" not in log
    assert "Exception ignored" not in log
