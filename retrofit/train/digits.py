"""The scikit-learn digits set written as an ImageFolder tree: real data that works offline.

``sklearn.datasets.load_digits()`` holds 1,797 real handwritten digits (the UCI "Optical
Recognition of Handwritten Digits" test set), 8×8 pixels with 17 grey levels (0–16), 10
classes. :func:`write_digits` writes them as 8-bit greyscale PNGs
``<folder>/{train,val}/<digit>/<index>.png`` with a stratified split that depends only on
``seed``, so the same call always yields the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RetrofitError

if TYPE_CHECKING:
    import numpy as np


def write_digits(
    folder: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the digits set as ``folder/train/<digit>/NNNN.png`` and ``folder/val/<digit>/NNNN.png``.

    Args:
        folder: target root; its ``train``/``val`` sub-folders must not exist unless ``overwrite``.
        val_fraction: share of each class put in ``val`` (stratified, 0 < f < 1); 0.2 gives
            1,437 train and 360 val images.
        seed: the split's random state (``sklearn.model_selection.train_test_split``).
        overwrite: replace existing ``train``/``val`` trees.

    Pixel values 0–16 are scaled to 0–255 (``round(v · 255 / 16)``); file names are the
    sample's index in ``load_digits()``.

    Returns: ``{"train": n_train, "val": n_val}``.

    Raises: :class:`RetrofitError` when scikit-learn is missing, the fraction is out of range,
    or the tree exists and ``overwrite`` is False.
    """
    if not 0 < val_fraction < 1:
        raise RetrofitError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RetrofitError("the digits set needs scikit-learn: pip install 'retrofit[demo]'") from None
    import numpy as np

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    return write_split_tree(folder, pixels, [str(int(t)) for t in digits.target], val_fraction=val_fraction,
                            seed=seed, overwrite=overwrite)


def write_split_tree(folder: str | os.PathLike, pixels: "np.ndarray", labels: list[str], *, val_fraction: float,
                     seed: int, overwrite: bool) -> dict[str, int]:
    """Write 8-bit greyscale images ``pixels`` (N, H, W) as ``folder/{train,val}/<label>/NNNN.png``.

    The split is stratified by label (``sklearn.model_selection.train_test_split`` with
    ``random_state=seed``); file names are the image's index in ``pixels``. Returns
    ``{"train": n_train, "val": n_val}``. Raises :class:`RetrofitError` when the tree exists and
    ``overwrite`` is False.
    """
    import shutil

    import numpy as np
    from PIL import Image
    from sklearn.model_selection import train_test_split

    root = Path(folder)
    splits = {"train": root / "train", "val": root / "val"}
    existing = [p for p in splits.values() if p.exists()]
    if existing and not overwrite:
        raise RetrofitError(f"{existing[0]} exists; pass --overwrite to replace it")
    for p in existing:
        shutil.rmtree(p)

    index = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=labels)
    counts = {}
    for split, chosen in (("train", train_idx), ("val", val_idx)):
        for i in sorted(chosen.tolist()):
            target = splits[split] / labels[i]
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i]).save(target / f"{i:04d}.png")
        counts[split] = len(chosen)
    return counts
