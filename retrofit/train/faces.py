"""scikit-image's LFW subset written as an ImageFolder tree: a second real labelled set that works offline.

``skimage.data.lfw_subset()`` holds 200 real 25×25 greyscale photographs from Labeled Faces in
the Wild: 100 faces and 100 non-face crops of the same photographs (scikit-image's
face-detection example data). :func:`write_faces` writes them as 8-bit PNGs
``<folder>/{train,val}/{face,non-face}/<index>.png`` with a stratified split that depends only on
``seed``, as :func:`retrofit.train.digits.write_digits` does for the digits.
"""

from __future__ import annotations

import os

from ..errors import RetrofitError
from .digits import write_split_tree


def write_faces(folder: str | os.PathLike, *, val_fraction: float = 0.5, seed: int = 0,
                overwrite: bool = False) -> dict[str, int]:
    """Write the LFW subset as ``folder/train/<class>/NNNN.png`` and ``folder/val/<class>/NNNN.png``.

    Args:
        folder: target root; its ``train``/``val`` sub-folders must not exist unless ``overwrite``.
        val_fraction: share of each class put in ``val`` (stratified, 0 < f < 1); 0.5 gives 100
            train and 100 val images (50 per class in each).
        seed: the split's random state.
        overwrite: replace existing ``train``/``val`` trees.

    Classes: ``face`` (the first 100 images of ``lfw_subset()``) and ``non-face`` (the last 100),
    as scikit-image's own example labels them. Values in [0, 1] become ``round(v · 255)``.

    Returns: ``{"train": n_train, "val": n_val}``.

    Raises: :class:`RetrofitError` when scikit-image or scikit-learn is missing, the fraction is
    out of range, or the tree exists and ``overwrite`` is False.
    """
    if not 0 < val_fraction < 1:
        raise RetrofitError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    try:
        import sklearn  # noqa: F401  (the split)
        from skimage import data
    except ImportError:
        raise RetrofitError("the faces set needs scikit-image and scikit-learn: pip install 'retrofit[demo]'") from None
    import numpy as np

    images = data.lfw_subset()  # (200, 25, 25) float64 in [0, 1]
    pixels = np.rint(images * 255.0).astype(np.uint8)
    labels = ["face"] * 100 + ["non-face"] * (len(pixels) - 100)
    return write_split_tree(folder, pixels, labels, val_fraction=val_fraction, seed=seed, overwrite=overwrite)
