"""The kinds of token tapsign issues and what each one says (its claims), as data.

* ``status`` -- held by the relying party's front end; reads one transaction's status;
  lives as long as the transaction plus ``STATUS_GRACE``; reusable.
* ``dispatch`` -- in the QR code or app link; lets a phone fetch one transaction and
  answer a registration; lives as long as the transaction; reusable until it ends.
* ``result`` -- made once, when a transaction succeeds, and stored with it: every status
  answer of the transaction carries the same one; proves the success to the relying
  party's backend through introspection; ``RESULT_LIFETIME``; consumed by its first use.
* ``intent`` -- held by a front end; starts one enrolment or approval for one user, in
  place of the access key, with what that operation shows bound by the backend;
  ``INTENT_LIFETIME``; once.

Each kind has its own audience (``tapsign:<kind>``), so no token serves as another kind.
Signing (in the HSM) and checking are api/tokens.py's and engine/actors.py's business.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

RESULT_LIFETIME = timedelta(minutes=5)
INTENT_LIFETIME = timedelta(minutes=5)
#: A front end reads the final status of a transaction that ended at its deadline.
STATUS_GRACE = timedelta(minutes=5)


class TokenKind(StrEnum):
    STATUS = "status"
    DISPATCH = "dispatch"
    RESULT = "result"
    INTENT = "intent"

    @property
    def audience(self) -> str:
        return f"tapsign:{self.value}"

    @property
    def media_type(self) -> str:
        """The JWT ``typ`` of this kind."""
        return f"{self.value}+jwt"


def token_claims(
    kind: TokenKind,
    *,
    subject: str,
    now: datetime,
    expires_at: datetime,
    claims: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The claims of a new token of ``kind`` (a fresh ``jti`` each)."""
    return {
        "aud": kind.audience,
        "sub": subject,
        "iat": int(now.timestamp()),
        "exp": int(expires_at.timestamp()),
        "jti": secrets.token_urlsafe(16),
        **(claims or {}),
    }
