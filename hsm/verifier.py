"""The batched verifier: many Trio callers, one worker thread per core, one thread hop per batch.

Theory of operation
-------------------
A caller's ``await verify(...)`` puts a request on a bounded queue and parks its task. A
dispatcher task takes everything queued, up to ``max_batch``, and hands the batch to the
worker threads over a thread-safe job queue; a worker verifies the whole batch in one
backend call and posts the outcomes back into Trio with ``run_sync_soon``, where each
waiting caller is rescheduled with its own outcome. Handing every single signature to a
thread would cost a GIL hand-over per signature, milliseconds when another thread is busy
(DESIGN.md); batching pays it once per batch.

Up to two batches per worker are outstanding, so a worker that finishes one takes the next
at once instead of waiting for the Trio thread to deliver results and dispatch again (with
``trio.to_thread`` per batch that round trip idled each core about a tenth of the time).
Under light load a batch is whatever is queued, often one request, so latency stays low;
under heavy load all slots are busy, the queue fills meanwhile, and batches grow exactly
when throughput matters.

The synchronous core (``submit_nowait``) does the work and the async wrapper only waits, as
trio's memory channels do. A full queue refuses at once with :class:`Overloaded` rather
than letting latency and memory grow without bound. A cancelled caller marks its request
abandoned: it is skipped if not yet dispatched and its outcome is dropped if in flight; the
other requests of its batch are untouched. A failure of the backend fails the batch it was
verifying, not the service.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import Counter, deque

import msgspec
import outcome
import trio

from hsm.errors import HsmPermanentError
from hsm.verify_backends import Outcome, VerifyBackend, VerifyItem
from tapsign_sdk.problems import Overloaded, ServiceUnavailable, TapsignError

log = logging.getLogger(__name__)

#: Batches outstanding per worker thread: one verifying, one waiting to be taken.
BATCHES_PER_WORKER = 2


class VerifierStatistics(msgspec.Struct, frozen=True, kw_only=True):
    backend: str
    workers: int
    queue_depth: int
    queue_capacity: int
    in_flight: int
    batches: int
    largest_batch: int
    mean_batch: float
    #: Batches of each size: ``{signatures: batches}``.
    batch_sizes: dict[int, int]
    #: Signatures found valid.
    verified: int
    #: Signatures found invalid (wrong, malformed or for another key).
    failed: int
    #: Requests that could not be verified (malformed public key, backend failure).
    errors: int
    #: Requests refused because the queue was full.
    overloaded: int
    #: Requests whose caller went away before the outcome.
    cancelled: int


class _Request:
    __slots__ = ("done", "item", "task")

    def __init__(self, item: VerifyItem, task: trio.lowlevel.Task) -> None:
        self.item = item
        self.task = task
        #: Set once the caller has been answered or has gone away; never rescheduled twice.
        self.done = False


_Batch = list[_Request]
_Job = tuple[_Batch, int]  # (batch, generation of the run that dispatched it)


class BatchVerifier:
    """Verify ECDSA P-256 signatures for many concurrent callers; run it with :meth:`run`."""

    def __init__(
        self,
        backend: VerifyBackend,
        *,
        workers: int,
        max_queue: int = 2048,
        max_batch: int = 128,
    ) -> None:
        if workers < 1 or max_queue < 1 or max_batch < 1:
            raise ValueError("workers, max_queue and max_batch must be at least 1")
        self.backend = backend
        self._workers = workers
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._queue: deque[_Request] = deque()
        self._work_available = trio.lowlevel.ParkingLot()
        # Made afresh by each run, so that nothing of a stopped run leaks into the next.
        self._slots = trio.Semaphore(workers * BATCHES_PER_WORKER)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._outstanding: dict[int, _Batch] = {}
        self._running = False
        self._generation = 0
        self._in_flight = 0
        self._batches = 0
        self._batched = 0
        self._largest_batch = 0
        self._batch_sizes: Counter[int] = Counter()
        self._verified = 0
        self._failed = 0
        self._errors = 0
        self._overloaded = 0
        self._cancelled = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; callers still waiting then get :class:`ServiceUnavailable`."""
        if self._running:
            raise RuntimeError("this verifier is already running")
        self._running = True
        self._generation += 1
        self._slots = trio.Semaphore(self._workers * BATCHES_PER_WORKER)
        self._jobs = jobs = queue.SimpleQueue[_Job | None]()
        token = trio.lowlevel.current_trio_token()
        threads = [
            threading.Thread(
                target=self._work,
                args=(jobs, token),
                name=f"tapsign-verifier-{index}",
                daemon=True,
            )
            for index in range(self._workers)
        ]
        for thread in threads:
            thread.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dispatch)
                task_status.started()
        finally:
            self._running = False
            # Workers finish the batch in hand and stop; its late outcome is ignored
            # (_complete checks the generation). Batches not yet taken are not verified.
            with contextlib.suppress(queue.Empty):
                while True:
                    jobs.get_nowait()
            for _ in threads:
                jobs.put(None)
            stopped = ServiceUnavailable("the signature verifier stopped")
            for request in self._queue:
                self._finish(request, outcome.Error(stopped))
            self._queue.clear()
            for batch in self._outstanding.values():
                for request in batch:
                    self._finish(request, outcome.Error(stopped))
            self._outstanding.clear()
            self._in_flight = 0

    def submit_nowait(self, *, public_key: bytes, message: bytes, signature: bytes) -> _Request:
        """Queue a request for the current task, or raise :class:`Overloaded` at once."""
        if not self._running:
            raise ServiceUnavailable("the signature verifier is not running")
        if len(self._queue) >= self._max_queue:
            self._overloaded += 1
            raise Overloaded(
                f"the signature verifier has {len(self._queue)} requests waiting",
                retry_after=1.0,
            )
        request = _Request((public_key, message, signature), trio.lowlevel.current_task())
        self._queue.append(request)
        if self._work_available:
            self._work_available.unpark()
        return request

    async def verify(self, *, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """True if ``signature`` is a valid ECDSA P-256/SHA-256 signature of ``message``.

        Raises :class:`~hsm.errors.InvalidPublicKey` for a key that is not P-256,
        :class:`Overloaded` when the queue is full.
        """
        request = self.submit_nowait(public_key=public_key, message=message, signature=signature)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            request.done = True
            self._cancelled += 1
            return trio.lowlevel.Abort.SUCCEEDED

        result: bool = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def statistics(self) -> VerifierStatistics:
        return VerifierStatistics(
            backend=self.backend.name,
            workers=self._workers,
            queue_depth=len(self._queue),
            queue_capacity=self._max_queue,
            in_flight=self._in_flight,
            batches=self._batches,
            largest_batch=self._largest_batch,
            mean_batch=self._batched / self._batches if self._batches else 0.0,
            batch_sizes=dict(self._batch_sizes),
            verified=self._verified,
            failed=self._failed,
            errors=self._errors,
            overloaded=self._overloaded,
            cancelled=self._cancelled,
        )

    # -- Trio side -------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            batch = self._take_batch()
            while not batch:
                await self._work_available.park()
                batch = self._take_batch()
            self._in_flight += len(batch)
            self._outstanding[id(batch)] = batch
            self._jobs.put((batch, self._generation))

    def _take_batch(self) -> _Batch:
        batch: _Batch = []
        pending = self._queue
        while pending and len(batch) < self._max_batch:
            request = pending.popleft()
            if not request.done:
                batch.append(request)
        if batch:
            self._batches += 1
            self._batched += len(batch)
            self._largest_batch = max(self._largest_batch, len(batch))
            self._batch_sizes[len(batch)] += 1
        return batch

    def _complete(
        self, batch: _Batch, generation: int, result: outcome.Outcome[list[Outcome]]
    ) -> None:
        """Runs in the Trio thread when a worker has verified ``batch``."""
        if generation != self._generation or not self._running:
            return  # that run has stopped and already answered these callers
        del self._outstanding[id(batch)]
        self._in_flight -= len(batch)
        self._slots.release()
        if isinstance(result, outcome.Value):
            self._deliver(batch, result.unwrap())
            return
        error = result.error if isinstance(result, outcome.Error) else None
        if not isinstance(error, TapsignError):
            log.error("signature verification failed for a batch of %d", len(batch), exc_info=error)
            error = HsmPermanentError("signature verification failed")
        self._errors += len(batch)
        for request in batch:
            self._finish(request, outcome.Error(error))

    def _deliver(self, batch: _Batch, outcomes: list[Outcome]) -> None:
        for request, result in zip(batch, outcomes, strict=True):
            if result is True:
                self._verified += 1
                self._finish(request, outcome.Value(True))
            elif result is False:
                self._failed += 1
                self._finish(request, outcome.Value(False))
            else:
                self._errors += 1
                self._finish(request, outcome.Error(result))

    @staticmethod
    def _finish(request: _Request, result: outcome.Outcome[bool]) -> None:
        # A cancelled caller's abort already ran; rescheduling it again would be an error.
        if not request.done:
            request.done = True
            trio.lowlevel.reschedule(request.task, result)

    # -- worker threads --------------------------------------------------------------------

    def _work(self, jobs: queue.SimpleQueue[_Job | None], token: trio.lowlevel.TrioToken) -> None:
        while (job := jobs.get()) is not None:
            batch, generation = job
            result = outcome.capture(self.backend.verify_batch, [request.item for request in batch])
            try:
                token.run_sync_soon(self._complete, batch, generation, result)
            except trio.RunFinishedError:
                return
