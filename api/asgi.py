"""``api.asgi:app``: the application for Hypercorn worker processes (``tapsign serve
--workers N`` and any ASGI server), configured from ``tapsign.toml`` and ``TAPSIGN_*``."""

from __future__ import annotations

from api.server import build_app
from api.settings import load_settings

app = build_app(load_settings())
