"""One scrape of ``/metrics`` describes the whole host: each worker process publishes its
metric families every second in ``[server] metrics_dir`` (``<pid>.json``, replaced
atomically), and the worker that answers a scrape adds the others' latest to its own, each
series labelled ``worker="<pid>"``, so that Prometheus sums them (``sum without
(worker)``). A published file is at most a second old; the file of a worker that is gone
is removed by the next scrape (its counters leave the sum then: a counter reset, which
``rate()`` copes with).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

#: Seconds between two publications of a worker's families.
PUBLISH_SECONDS = 1.0


class Sample(msgspec.Struct, frozen=True, array_like=True):
    #: The sample's name: the family's, or with ``_bucket``, ``_sum``, ``_count``.
    name: str
    #: Rendered labels without braces (``route="/x",method="GET"``), or "".
    labels: str
    value: float


class Family(msgspec.Struct, frozen=True, array_like=True):
    name: str
    kind: str
    help: str
    samples: list[Sample]


_FAMILIES = msgspec.json.Decoder(list[Family])


def exposition(workers: Mapping[int, Sequence[Family]]) -> str:
    """The text exposition format (version 0.0.4) of every worker's families: one HELP
    and TYPE per family, then every worker's samples labelled with its pid."""
    order: dict[str, Family] = {}
    for families in workers.values():
        for family in families:
            order.setdefault(family.name, family)
    lines: list[str] = []
    for name, first in order.items():
        lines.append(f"# HELP {name} {first.help}")
        lines.append(f"# TYPE {name} {first.kind}")
        for pid, families in sorted(workers.items()):
            for family in families:
                if family.name != name:
                    continue
                for sample in family.samples:
                    labels = f'worker="{pid}"' + (f",{sample.labels}" if sample.labels else "")
                    lines.append(f"{sample.name}{{{labels}}} {sample.value}")
    return "\n".join(lines) + "\n"


class Board:
    """The workers' latest families, in ``directory`` (None: this process alone)."""

    def __init__(self, directory: str | None) -> None:
        self._directory = None if directory is None else Path(directory)
        self._pid = os.getpid()

    def publish(self, families: Sequence[Family]) -> None:
        if self._directory is None:
            return
        self._pid = os.getpid()  # a worker forked from a parent that made the board
        try:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            staged = self._directory / f".{self._pid}.json"
            staged.write_bytes(msgspec.json.encode(list(families)))
            staged.replace(self._directory / f"{self._pid}.json")
        except OSError as exc:
            log.warning("cannot publish this worker's metrics in %s: %s", self._directory, exc)

    def withdraw(self) -> None:
        if self._directory is not None:
            with contextlib.suppress(OSError):
                (self._directory / f"{self._pid}.json").unlink()

    def others(self) -> dict[int, list[Family]]:
        """The latest families of every other live worker of this host."""
        if self._directory is None:
            return {}
        found: dict[int, list[Family]] = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._directory):
                stem, _, suffix = entry.name.partition(".")
                if suffix != "json" or not stem.isdigit() or int(stem) == os.getpid():
                    continue
                pid = int(stem)
                if not _alive(pid):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                try:
                    found[pid] = _FAMILIES.decode(Path(entry.path).read_bytes())
                except (OSError, msgspec.DecodeError):
                    continue  # replaced or removed meanwhile: the next scrape has it
        return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
