"""The audit trail: append-only, hash-chained (PSD2 RTS arts. 3 and 29; checklist item 16).

Every state change of an operation and every administrative action on a user or device
appends one entry, in the same transaction as the change it records. Entry ``n`` stores
``hash_n = SHA-256(hash_{n-1} || canonical(entry_n))`` and its predecessor's hash, and a
one-row head records the newest ``(seq, hash)``. :func:`verify_chain` recomputes the chain:
an edited entry breaks its own hash, a removed or reordered one breaks the sequence or the
link, a truncated tail disagrees with the head. (Whoever can rewrite the whole table and
the head can rewrite history; ``tapsign audit checkpoint`` closes that gap: it signs the
head in the HSM, the operator keeps the signed checkpoints elsewhere, and ``tapsign audit
verify --checkpoints FILE`` checks that the trail still holds every checkpointed entry with
its hash, so a rewrite of the whole table before the newest checkpoint is found too.)

Entries name the operation, user and device by id only: no attribute values, contexts,
keys or tokens ever enter the trail.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from uuid import UUID

import msgspec

GENESIS_HASH = bytes(32)
#: The audience of a signed checkpoint of the trail's head (``tapsign audit checkpoint``).
CHECKPOINT_AUDIENCE = "tapsign:audit-checkpoint"


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    at: datetime
    #: Who acted: ``system``, ``relying-party:<client>``, ``device:<id>``, ``admin``.
    actor: str
    #: What happened, e.g. ``operation.succeeded``, ``user.locked``, ``device.locked``.
    action: str
    operation_id: UUID | None = None
    user_id: UUID | None = None
    device_id: UUID | None = None
    outcome: str
    reason: str | None = None
    prev_hash: bytes = GENESIS_HASH
    hash: bytes = GENESIS_HASH


def entry_hash(entry: AuditEntry, prev_hash: bytes) -> bytes:
    """The chained hash of ``entry`` (its own ``hash`` and ``prev_hash`` fields excluded)."""
    canonical = json.dumps(
        [
            entry.seq,
            entry.at.astimezone(UTC).isoformat(timespec="microseconds"),
            entry.actor,
            entry.action,
            None if entry.operation_id is None else str(entry.operation_id),
            None if entry.user_id is None else str(entry.user_id),
            None if entry.device_id is None else str(entry.device_id),
            entry.outcome,
            entry.reason,
        ],
        separators=(",", ":"),
    ).encode()
    return hashlib.sha256(prev_hash + canonical).digest()


def verify_chain(entries: Iterable[AuditEntry], *, head_seq: int, head_hash: bytes) -> list[str]:
    """Every inconsistency found, in order; an empty list means the trail is intact."""
    problems: list[str] = []
    expected_seq, previous = 1, GENESIS_HASH
    for entry in entries:
        if entry.seq != expected_seq:
            problems.append(f"entry {entry.seq} found where entry {expected_seq} was expected")
        if entry.prev_hash != previous:
            problems.append(f"entry {entry.seq} does not follow the entry before it")
        if entry.hash != entry_hash(entry, entry.prev_hash):
            problems.append(f"entry {entry.seq} was altered")
        expected_seq, previous = entry.seq + 1, entry.hash
    if expected_seq - 1 != head_seq or previous != head_hash:
        problems.append(f"the trail ends at entry {expected_seq - 1}, the head says {head_seq}")
    return problems


def verify_checkpoint(entries: Iterable[AuditEntry], *, seq: int, hash: bytes) -> str | None:
    """What is wrong with the trail against a checkpoint ``(seq, hash)`` whose signature
    was verified; None if the trail holds entry ``seq`` with that hash."""
    for entry in entries:
        if entry.seq == seq:
            if entry.hash != hash:
                return f"entry {seq} differs from its signed checkpoint"
            return None
    return f"entry {seq} of a signed checkpoint is missing"
