"""``tapsign bench verify``: the batched verifier's throughput against a ceiling of the same run.

The verifier is driven the way the engine drives it, by many concurrent Trio tasks each
awaiting one ``verify`` at a time, over a workload of distinct device keys in both key
formats and both signature formats, one signature in eight wrong; every outcome is
checked against the expected one, so a fast wrong verifier fails the benchmark.

Ceilings, measured right after on the same machine:

* ``openssl``: ``openssl speed -multi <cores> ecdsap256``, verify/s of all cores;
* ``pkcs11``: one thread calling python-pkcs11 ``C_Verify`` in a loop with one reused key
  object, hashing each message on the host as the backend does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Sequence

import msgspec
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pkcs11 import Mechanism, Object

from hsm import ecdsa
from hsm.pkcs11_token import Pkcs11Token, PooledSession
from hsm.settings import VerifierSettings
from hsm.verifier import BatchVerifier, VerifierStatistics
from hsm.verify_backends import VerifyBackend, VerifyItem, import_public_key
from tapsign_sdk.problems import TapsignError

WORKLOAD_KEYS = 1024


class BenchmarkError(TapsignError):
    """The benchmark could not run, or the verifier returned a wrong outcome."""


class VerifyBenchReport(msgspec.Struct, frozen=True, kw_only=True):
    backend: str
    machine: str
    cores: int
    workers: int
    concurrency: int
    seconds: float
    verifications: int
    verifier_per_second: float
    ceiling: str
    ceiling_per_second: float
    ratio: float
    statistics: VerifierStatistics


def make_workload(size: int = WORKLOAD_KEYS) -> list[tuple[VerifyItem, bool]]:
    """``size`` items with distinct keys; formats alternate; every eighth signature is wrong."""
    workload = []
    for index in range(size):
        private = ec.generate_private_key(ec.SECP256R1())
        message = os.urandom(160)
        der = private.sign(message, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = der if index % 2 else r.to_bytes(32, "big") + s.to_bytes(32, "big")
        public = private.public_key()
        key = (
            ecdsa.encode_point(public)
            if index % 3
            else public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        valid = index % 8 != 7
        if not valid:
            message = message[:-1] + bytes([message[-1] ^ 1])
        workload.append(((key, message, signature), valid))
    return workload


async def measure_verifier(
    verifier: BatchVerifier,
    workload: Sequence[tuple[VerifyItem, bool]],
    *,
    seconds: float,
    concurrency: int,
) -> tuple[int, float]:
    """``(verifications, elapsed seconds)`` of ``concurrency`` tasks verifying for ``seconds``."""
    completed = 0
    wrong: list[int] = []

    async def caller(offset: int) -> None:
        nonlocal completed
        index = offset
        while True:
            (public_key, message, signature), expected = workload[index % len(workload)]
            valid = await verifier.verify(
                public_key=public_key, message=message, signature=signature
            )
            if valid is not expected:
                wrong.append(index % len(workload))
            completed += 1
            index += concurrency

    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        started = trio.current_time()
        # The deadline cancels the callers mid-request: their requests count as cancelled.
        with trio.move_on_at(started + seconds):
            async with trio.open_nursery() as callers:
                for offset in range(concurrency):
                    callers.start_soon(caller, offset)
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    if wrong:
        raise BenchmarkError(f"the verifier returned {len(wrong)} wrong outcomes")
    return completed, elapsed


def openssl_ceiling(*, seconds: int, cores: int) -> float:
    """Verify/s of ``openssl speed -multi <cores> ecdsap256`` (machine-readable output)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise BenchmarkError("the openssl command is needed for the ceiling and is not installed")
    completed = subprocess.run(  # noqa: S603 - fixed arguments, no shell
        [openssl, "speed", "-mr", "-seconds", str(seconds), "-multi", str(cores), "ecdsap256"],
        capture_output=True,
        text=True,
        check=False,
        timeout=seconds * 4 + 60,
    )
    # The summary line of all processes: +F4:<index>:<bits>:<sign/s>:<verify/s>
    totals = re.findall(r"^\+F4:\d+:256:([\d.]+):([\d.]+)$", completed.stdout, re.MULTILINE)
    if completed.returncode != 0 or not totals:
        raise BenchmarkError(f"openssl speed failed: {completed.stderr.strip()[-200:]}")
    return float(totals[-1][1])


def pkcs11_ceiling(
    token: Pkcs11Token, workload: Sequence[tuple[VerifyItem, bool]], *, seconds: float
) -> float:
    """Verify/s of one thread calling ``C_Verify`` with one reused key object."""
    (public_key, message, signature), _ = next(item for item in workload if item[1])
    point = ecdsa.encode_point(ecdsa.load_public_key(public_key))
    raw = ecdsa.raw_signature(signature)
    if raw is None:
        raise BenchmarkError("the workload holds a malformed signature")

    def loop(pooled: PooledSession) -> float:
        key = import_public_key(pooled, point)
        count = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                if not key.verify(hashlib.sha256(message).digest(), raw, mechanism=Mechanism.ECDSA):
                    raise BenchmarkError("the ceiling loop failed to verify a valid signature")
            count += 100
        elapsed = time.perf_counter() - started
        if isinstance(key, Object):
            key.destroy()
        return count / elapsed

    return token.run(loop)


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
            if found:
                model = found.group(1).strip()
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def bench_verify(
    backend: VerifyBackend,
    settings: VerifierSettings,
    *,
    token: Pkcs11Token | None,
    seconds: int,
    concurrency: int,
) -> VerifyBenchReport:
    """Measure the verifier over ``backend`` for ``seconds``, then its ceiling for as long."""
    workload = make_workload()
    verifier = BatchVerifier(
        backend,
        workers=settings.worker_count(),
        max_queue=max(settings.max_queue, concurrency),
        max_batch=settings.max_batch,
    )
    count, elapsed = trio.run(
        functools.partial(
            measure_verifier, verifier, workload, seconds=seconds, concurrency=concurrency
        )
    )
    cores = os.cpu_count() or 1
    if token is None:
        ceiling = f"openssl speed -multi {cores} ecdsap256"
        ceiling_per_second = openssl_ceiling(seconds=seconds, cores=cores)
    else:
        ceiling = "python-pkcs11 C_Verify loop, 1 thread, reused key object"
        ceiling_per_second = pkcs11_ceiling(token, workload, seconds=seconds)
    per_second = count / elapsed
    return VerifyBenchReport(
        backend=backend.name,
        machine=machine_description(),
        cores=cores,
        workers=settings.worker_count(),
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        verifications=count,
        verifier_per_second=round(per_second, 1),
        ceiling=ceiling,
        ceiling_per_second=round(ceiling_per_second, 1),
        ratio=round(per_second / ceiling_per_second, 3),
        statistics=verifier.statistics(),
    )
