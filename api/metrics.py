"""``/metrics``: the statistics of the requests, the verifier, the actors, the callbacks and
the database pool of this worker process, as metric families (api/exposition.py renders
them with the other workers' of this host)."""

from __future__ import annotations

from api.exposition import Family, Sample
from api.routing import Services
from engine.histogram import BATCH_SIZES, Histogram, Histograms


def families(services: Services) -> list[Family]:
    engine = services.engine
    admission = services.admission
    verifier = engine.verifier.statistics()
    supervisor = engine.supervisor.statistics()
    callbacks = engine.callbacks.statistics()
    pool = engine.store.engine.pool
    store = engine.store.statistics()
    peers = engine.peers.statistics()
    backend = f'backend="{verifier.backend}"'
    rows: list[tuple[str, str, str, float, str]] = [
        (
            "tapsign_requests_active",
            "gauge",
            "Requests being served, this one included (long-polls that wait not counted)",
            admission.active,
            "",
        ),
        (
            "tapsign_requests_shed_total",
            "counter",
            "New transactions refused with 503 while saturated",
            admission.shed,
            "",
        ),
        (
            "tapsign_long_polls_waiting",
            "gauge",
            "Status long-polls being held",
            services.long_polls.waiting,
            "",
        ),
        (
            "tapsign_long_polls_not_held_total",
            "counter",
            "Status long-polls answered at once: too many held for the transaction or address",
            services.long_polls.not_held,
            "",
        ),
        (
            "tapsign_device_requests_limited_total",
            "counter",
            "Device API requests refused with 429 by the rate limit",
            services.address_limit.refused,
            'by="address"',
        ),
        (
            "tapsign_device_requests_limited_total",
            "counter",
            "Device API requests refused with 429 by the rate limit",
            services.device_limit.refused,
            'by="device"',
        ),
        (
            "tapsign_verifier_queue_depth",
            "gauge",
            "Signatures waiting for a worker",
            verifier.queue_depth,
            backend,
        ),
        (
            "tapsign_verifier_queue_capacity",
            "gauge",
            "Queue bound; beyond it requests get 503",
            verifier.queue_capacity,
            backend,
        ),
        (
            "tapsign_verifier_in_flight",
            "gauge",
            "Signatures being verified",
            verifier.in_flight,
            backend,
        ),
        (
            "tapsign_verifier_batches_total",
            "counter",
            "Batches verified",
            verifier.batches,
            backend,
        ),
        (
            "tapsign_verifier_valid_total",
            "counter",
            "Signatures found valid",
            verifier.verified,
            backend,
        ),
        (
            "tapsign_verifier_invalid_total",
            "counter",
            "Signatures found invalid",
            verifier.failed,
            backend,
        ),
        (
            "tapsign_verifier_errors_total",
            "counter",
            "Requests that could not be verified",
            verifier.errors,
            backend,
        ),
        (
            "tapsign_verifier_overloaded_total",
            "counter",
            "Requests refused, queue full",
            verifier.overloaded,
            backend,
        ),
        (
            "tapsign_verifier_cancelled_total",
            "counter",
            "Requests whose caller left",
            verifier.cancelled,
            backend,
        ),
        (
            "tapsign_operations_live",
            "gauge",
            "Pending operations with an actor here",
            supervisor.live_operations,
            "",
        ),
        (
            "tapsign_operations_started_total",
            "counter",
            "Operations started here",
            supervisor.started,
            "",
        ),
        (
            "tapsign_operations_resumed_total",
            "counter",
            "Operations resumed at start-up",
            supervisor.resumed,
            "",
        ),
        (
            "tapsign_operations_changed_elsewhere_total",
            "counter",
            "Operations with an actor here that another process changed",
            supervisor.changed_elsewhere,
            "",
        ),
        (
            "tapsign_peer_notices_sent_total",
            "counter",
            "Changes announced to the other processes",
            peers.sent,
            "",
        ),
        (
            "tapsign_peer_notices_dropped_total",
            "counter",
            "Announcements a busy or failing peer could not take",
            peers.dropped,
            "",
        ),
        (
            "tapsign_peer_notices_received_total",
            "counter",
            "Announcements received from the other processes",
            peers.received,
            "",
        ),
        (
            "tapsign_peer_resyncs_total",
            "counter",
            "Times notices may have been lost and what moved was read again",
            peers.resynced,
            "",
        ),
        (
            "tapsign_callbacks_queued",
            "gauge",
            "Callbacks waiting for delivery",
            callbacks.queued,
            "",
        ),
        (
            "tapsign_callbacks_in_flight",
            "gauge",
            "Callback requests in flight",
            callbacks.in_flight,
            "",
        ),
        (
            "tapsign_callbacks_delivered_total",
            "counter",
            "Callbacks delivered",
            callbacks.delivered,
            "",
        ),
        (
            "tapsign_callbacks_retried_total",
            "counter",
            "Callback attempts that failed and will retry",
            callbacks.retried,
            "",
        ),
        (
            "tapsign_callbacks_given_up_total",
            "counter",
            "Callbacks given up",
            callbacks.given_up,
            "",
        ),
        (
            "tapsign_database_writes_total",
            "counter",
            "Units of work written (one thread hop and, alone, one transaction each)",
            store.writes,
            "",
        ),
        (
            "tapsign_database_reads_total",
            "counter",
            "Read transactions (one thread hop each)",
            store.reads,
            "",
        ),
        (
            "tapsign_database_write_groups_total",
            "counter",
            "Transactions of grouped writes",
            store.groups,
            "",
        ),
        (
            "tapsign_database_grouped_writes_total",
            "counter",
            "Units of work in them",
            store.grouped_writes,
            "",
        ),
        (
            "tapsign_database_largest_write_group",
            "gauge",
            "Most units in one transaction",
            store.largest_group,
            "",
        ),
        (
            "tapsign_database_queued_writes",
            "gauge",
            "Units waiting for the writer",
            store.queued_writes,
            "",
        ),
        (
            "tapsign_database_connections_in_use",
            "gauge",
            "Pooled connections checked out",
            float(pool.checkedout()),  # type: ignore[attr-defined] # QueuePool has it
            "",
        ),
    ]
    found: dict[str, Family] = {}
    for name, kind, description, value, labels in rows:
        family = found.setdefault(name, Family(name, kind, description, []))
        family.samples.append(Sample(name, labels, float(value)))
    batches = Histograms(BATCH_SIZES)
    for size, count in verifier.batch_sizes.items():
        batches.observe(backend, size, count)
    return [
        *found.values(),
        _histogram(
            "tapsign_request_duration_seconds",
            "Seconds from a request's arrival to its response, per route (long-polls wait)",
            services.requests,
        ),
        _histogram(
            "tapsign_transaction_duration_seconds",
            "Seconds from start to end of the transactions this process ended, per kind",
            engine.supervisor.context.durations,
        ),
        _histogram("tapsign_verifier_batch_size", "Signatures per verifier batch", batches),
    ]


def _histogram(name: str, description: str, histograms: Histograms) -> Family:
    samples: list[Sample] = []
    for labels, histogram in sorted(histograms.by_label.items()):
        samples.extend(_series(name, labels, histogram))
    return Family(name, "histogram", description, samples)


def _series(name: str, labels: str, histogram: Histogram) -> list[Sample]:
    prefix = f"{labels}," if labels else ""
    return [
        *(
            Sample(f"{name}_bucket", f'{prefix}le="{bound}"', float(count))
            for bound, count in histogram.buckets()
        ),
        Sample(f"{name}_sum", labels, histogram.sum),
        Sample(f"{name}_count", labels, float(histogram.count)),
    ]
