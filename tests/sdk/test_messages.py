"""Property-based fuzzing of what phones send: whatever the bytes, decoding an answer or a
redeem request gives the message or a clean 400/422 naming the problem, never anything
else (the route turns those into problem+json; tests/e2e/test_fuzz.py checks the wire)."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from api.routing import decode_body
from tapsign_sdk import wire
from tapsign_sdk.problems import BadRequest, InvalidInput

FUZZ_EXAMPLES = int(os.environ.get("TAPSIGN_FUZZ_EXAMPLES", "200"))

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5)
    ),
    max_leaves=25,
)
B64 = st.binary(max_size=80).map(lambda raw: base64.b64encode(raw).decode())
#: Answers that are nearly right: the real field names with values of any kind.
NEAR_ANSWER = st.fixed_dictionaries(
    {},
    optional={
        "decision": st.sampled_from(["approve", "decline", "APPROVE", ""]) | JSON,
        "userVerification": st.sampled_from(["biometric", "pin", "none", "face"]) | JSON,
        "counter": st.integers(min_value=-(2**65), max_value=2**65) | JSON,
        "signature": B64 | JSON,
        "publicKey": B64 | JSON,
        "name": st.text(max_size=200) | JSON,
        "platform": st.text(max_size=40) | JSON,
        "extra": JSON,
    },
)


def _decoded_or_refused(data: bytes, kind: Any) -> None:
    refused: BadRequest | InvalidInput | None = None
    try:
        decoded = decode_body(data, "application/json", kind)
    except (BadRequest, InvalidInput) as exc:
        refused = exc
    if refused is None:
        assert isinstance(decoded, kind)
    else:
        assert str(refused)
        assert refused.status in (400, 422)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.binary(max_size=300)
    | JSON.map(lambda value: json.dumps(value).encode())
    | NEAR_ANSWER.map(lambda value: json.dumps(value).encode())
)
def test_any_bytes_as_an_answer_or_a_redeem_request(data: bytes) -> None:
    _decoded_or_refused(data, wire.Answer)
    _decoded_or_refused(data, wire.Redeem)


def test_deeply_nested_json_is_refused_not_overflowed() -> None:
    for opening, closing in ((b"[", b"]"), (b'{"a":', b"}")):
        _decoded_or_refused(opening * 100_000 + closing * 100_000, wire.Answer)
