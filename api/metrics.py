"""``/metrics``: the statistics of the requests, the verifier, the actors, the callbacks and
the database pool, in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from api.routing import Services


def metrics_text(services: Services) -> str:
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
        ("tapsign_verifier_mean_batch", "gauge", "Mean batch size", verifier.mean_batch, backend),
        (
            "tapsign_verifier_largest_batch",
            "gauge",
            "Largest batch",
            verifier.largest_batch,
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
    lines: list[str] = []
    previous = ""
    for name, kind, description, value, labels in rows:
        if name != previous:  # one HELP and TYPE per metric, its labelled series below
            lines.append(f"# HELP {name} {description}")
            lines.append(f"# TYPE {name} {kind}")
            previous = name
        lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
    return "\n".join(lines) + "\n"
