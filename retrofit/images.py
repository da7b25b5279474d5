"""Image files to RGB, the way the models were trained to see them.

PIL's ``convert("RGB")`` clips 16-bit and 32-bit greyscale modes (``I;16``, ``I``, ``F``) to
255, so a 16-bit PNG becomes a white frame; :func:`to_rgb` rescales those to 8 bits first.
"""

from __future__ import annotations

from typing import Any


def to_rgb(image: Any) -> Any:
    """A PIL image as 8-bit RGB; 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``)
    greyscale is rescaled to 0…255 (16-bit range for integers up to 65535, else the image's max;
    floats of 0…1 by 255, else by their max) instead of being clipped."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        import numpy as np

        a = np.asarray(image, dtype=np.float64)
        peak = float(a.max()) if a.size else 0.0
        if image.mode == "F":
            scale = 255.0 if peak <= 1.0 else 255.0 / peak
        else:
            scale = 255.0 / 65535.0 if peak <= 65535 else 255.0 / peak
        image = Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), mode="L")
    return image.convert("RGB")
