"""QR codes for cross-device flows: a real PNG, as a data URI (what Nevis returns)."""

from __future__ import annotations

import segno

from tapsign_sdk.wire import QrCode

TARGET_PIXELS = 300


def qr_code(text: str) -> QrCode:
    """A PNG QR code of ``text`` close to 300 px wide, error correction level M."""
    # A fixed mask (0) skips evaluating all eight (SO/IEC 18004 §7.8.3): 2.6 times faster,
    # and any mask scans.
    code = segno.make(text, error="m", micro=False, mask=0, boost_error=False)
    modules = int(code.symbol_size(scale=1, border=4)[0])
    scale = max(1, TARGET_PIXELS // modules)
    return QrCode(size=modules * scale, data_uri=code.png_data_uri(scale=scale, border=4))
