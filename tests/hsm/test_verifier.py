"""The batched verifier: batching, overload, cancellation, failures, stop and restart.

A gate in front of the real OpenSSL backend holds the worker thread, so that each test
decides what is queued, what is in flight and when it completes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.errors import HsmPermanentError, HsmTransientError, InvalidPublicKey
from hsm.pkcs11_token import Pkcs11Token
from hsm.verifier import BatchVerifier
from hsm.verify_backends import OpenSSLVerifyBackend, Outcome, Pkcs11VerifyBackend, VerifyItem
from tapsign_sdk.problems import Overloaded, ServiceUnavailable

KEY = ec.generate_private_key(ec.SECP256R1())
POINT = KEY.public_key().public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
)


def signed(message: bytes) -> dict[str, bytes]:
    return {
        "public_key": POINT,
        "message": message,
        "signature": KEY.sign(message, ec.ECDSA(hashes.SHA256())),
    }


class GatedBackend(OpenSSLVerifyBackend):
    """The real backend, but each batch waits for ``gate`` and batch sizes are recorded."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.sizes: list[int] = []

    def verify_batch(self, batch: Sequence[VerifyItem]) -> list[Outcome]:
        if not self.gate.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        self.sizes.append(len(batch))
        if any(message == b"boom" for _, message, _ in batch):
            raise RuntimeError("a bug in a backend")
        if any(message == b"hsm away" for _, message, _ in batch):
            raise HsmTransientError("HSM session lost (TokenNotPresent)")
        return super().verify_batch(batch)


@pytest.fixture
def backend() -> GatedBackend:
    return GatedBackend()


@pytest.fixture
async def verifier(backend: GatedBackend) -> AsyncIterator[BatchVerifier]:
    verifier = BatchVerifier(backend, workers=1, max_queue=64, max_batch=16)
    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        yield verifier
        backend.gate.set()
        nursery.cancel_scope.cancel()


async def test_concurrent_callers_are_batched_and_get_their_own_outcomes(
    verifier: BatchVerifier, backend: GatedBackend
) -> None:
    outcomes: dict[int, bool] = {}

    async def caller(index: int) -> None:
        request = signed(b"message %d" % index)
        if index % 3 == 0:
            request["message"] += b" changed"
        outcomes[index] = await verifier.verify(**request)

    async with trio.open_nursery() as nursery:
        for index in range(40):
            nursery.start_soon(caller, index)
        await trio.testing.wait_all_tasks_blocked()
        backend.gate.set()

    assert outcomes == {index: index % 3 != 0 for index in range(40)}
    stats = verifier.statistics()
    assert (stats.verified, stats.failed, stats.errors) == (26, 14, 0)
    assert sum(backend.sizes) == 40
    # Held at the gate, at most two batches were dispatched before the queue filled; the
    # rest came in batches of max_batch (16).
    assert stats.largest_batch == 16
    assert stats.batches == len(backend.sizes) <= 5
    assert stats.queue_depth == stats.in_flight == 0


async def test_full_queue_refuses_at_once(verifier: BatchVerifier, backend: GatedBackend) -> None:
    small = BatchVerifier(backend, workers=1, max_queue=3, max_batch=1)
    results: list[bool] = []

    async def caller(index: int) -> None:
        results.append(await small.verify(**signed(b"%d" % index)))

    async with trio.open_nursery() as nursery:
        await nursery.start(small.run)
        async with trio.open_nursery() as callers:
            # One batch verifying and one waiting fill the two slots of the single worker ...
            for index in range(2):
                callers.start_soon(caller, index)
                await trio.testing.wait_all_tasks_blocked()
            # ... then three requests fill the queue.
            for index in range(2, 5):
                callers.start_soon(caller, index)
            await trio.testing.wait_all_tasks_blocked()
            assert small.statistics().queue_depth == 3

            with pytest.raises(
                Overloaded, match=r"^the signature verifier has 3 requests waiting$"
            ) as raised:
                await small.verify(**signed(b"one too many"))
            assert raised.value.retry_after == 1.0
            assert raised.value.status == 503
            backend.gate.set()
        nursery.cancel_scope.cancel()

    assert results == [True] * 5
    stats = small.statistics()
    assert (stats.overloaded, stats.verified) == (1, 5)


async def test_cancelled_caller_leaves_its_batch_untouched(
    verifier: BatchVerifier, backend: GatedBackend, autojump_clock: trio.testing.MockClock
) -> None:
    results: dict[str, bool] = {}

    async def patient(name: str) -> None:
        results[name] = await verifier.verify(**signed(name.encode()))

    async def impatient(name: str) -> None:
        with trio.move_on_after(5):
            results[name] = await verifier.verify(**signed(name.encode()))

    async with trio.open_nursery() as nursery:
        # Dispatched: "first" waits at the gate in the worker thread, "second" behind it.
        for name in ("first", "second"):
            nursery.start_soon(patient, name)
            await trio.testing.wait_all_tasks_blocked()
        # Queued, to be dispatched in one batch together.
        for name in ("a", "b", "c"):
            nursery.start_soon(patient, name)
        nursery.start_soon(impatient, "gives up while queued")
        await trio.testing.wait_all_tasks_blocked()
        # The autojump clock jumps to the deadline: the impatient caller is cancelled.
        await trio.sleep(10)
        assert "gives up while queued" not in results
        backend.gate.set()

    assert results == {"first": True, "second": True, "a": True, "b": True, "c": True}
    assert verifier.statistics().cancelled == 1
    assert backend.sizes == [1, 1, 3]  # the cancelled request was never verified


async def test_cancelled_in_flight_caller_does_not_disturb_the_others(
    verifier: BatchVerifier, backend: GatedBackend
) -> None:
    results: dict[str, bool] = {}
    scope = trio.CancelScope()

    async def caller(name: str, cancel_scope: trio.CancelScope | None = None) -> None:
        with cancel_scope or trio.CancelScope():
            results[name] = await verifier.verify(**signed(name.encode()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, "a")
        nursery.start_soon(caller, "cancelled", scope)
        nursery.start_soon(caller, "b")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        backend.gate.set()

    assert results == {"a": True, "b": True}
    assert sum(backend.sizes) == 3  # the cancelled one was in flight, its outcome dropped


async def test_malformed_key_fails_only_its_caller(
    verifier: BatchVerifier, backend: GatedBackend
) -> None:
    backend.gate.set()
    request = signed(b"m")
    with pytest.raises(InvalidPublicKey, match=r"^not a P-256 public key"):
        await verifier.verify(**{**request, "public_key": b"\x04" + bytes(64)})
    assert await verifier.verify(**request) is True
    assert verifier.statistics().errors == 1


async def test_backend_failure_fails_its_batch_not_the_service(
    verifier: BatchVerifier, backend: GatedBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.gate.set()
    with (
        caplog.at_level(logging.ERROR, logger="hsm.verifier"),
        pytest.raises(HsmPermanentError, match=r"^signature verification failed$"),
    ):
        await verifier.verify(**signed(b"boom"))
    assert "a bug in a backend" in caplog.text
    with pytest.raises(HsmTransientError, match=r"^HSM session lost \(TokenNotPresent\)$"):
        await verifier.verify(**signed(b"hsm away"))
    assert await verifier.verify(**signed(b"fine again")) is True


async def test_not_running_is_unavailable(backend: GatedBackend) -> None:
    verifier = BatchVerifier(backend, workers=1)
    with pytest.raises(ServiceUnavailable, match=r"^the signature verifier is not running$"):
        await verifier.verify(**signed(b"m"))


async def test_stopping_answers_waiting_callers_and_a_restart_serves_again(
    backend: GatedBackend,
) -> None:
    verifier = BatchVerifier(backend, workers=1, max_batch=1)
    errors: list[str] = []

    async def caller(name: str) -> None:
        try:
            await verifier.verify(**signed(name.encode()))
        except ServiceUnavailable as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        service = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with service:
                await verifier.run(task_status=task_status)

        await nursery.start(serve)
        for name in ("in flight", "waiting", "queued"):
            nursery.start_soon(caller, name)
        await trio.testing.wait_all_tasks_blocked()
        service.cancel()
    assert errors == ["the signature verifier stopped"] * 3

    backend.gate.set()  # the old worker finishes; its late outcome is ignored
    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        assert await verifier.verify(**signed(b"after restart")) is True
        nursery.cancel_scope.cancel()


async def test_pkcs11_backend_under_the_verifier(token: Pkcs11Token) -> None:
    verifier = BatchVerifier(Pkcs11VerifyBackend(token), workers=2, max_batch=8)
    results: list[bool] = []

    async def caller(index: int) -> None:
        request = signed(b"%d" % index)
        if index % 2:
            request["signature"] = signed(b"other")["signature"]
        results.append(await verifier.verify(**request) is (index % 2 == 0))

    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        async with trio.open_nursery() as callers:
            for index in range(64):
                callers.start_soon(caller, index)
        nursery.cancel_scope.cancel()
    assert results == [True] * 64
    stats = verifier.statistics()
    assert (stats.verified, stats.failed) == (32, 32)
