"""Top-k predictions on image files, with the model's own timm preprocessing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RetrofitError


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image: ``classes[i]`` with probability ``probs[i]`` (softmax), best first."""

    image: str
    classes: list[int]
    probs: list[float]
    logits: torch.Tensor  # (num_classes,)
    names: list[str]


def class_names(model: nn.Module) -> list[str] | None:
    """Names of the model's classes: ImageNet-1k descriptions (timm ``ImageNetInfo``) for a
    1000-class head, the ``classes`` a fine-tuning run recorded, else None."""
    recorded = getattr(model, "retrofit_class_names", None)
    if recorded:
        return list(recorded)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        num_classes = last[-1].out_features if last else None
    if num_classes != 1000:
        return None
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def random_weights(model: nn.Module) -> bool:
    """Whether ``model`` holds the random weights of ``--no-pretrained`` and was never fine-tuned since.

    Read from the weights origin :func:`retrofit.load_model` records (``"random"``), which a
    checkpoint's recipe keeps; a checkpoint written by ``retrofit finetune`` has trained weights.
    """
    from .models import SOURCE_MARK

    source = getattr(model, SOURCE_MARK, None) or {}
    return source.get("weights") == "random" and getattr(model, "retrofit_data_config", None) is None


def eval_transform(model: nn.Module):
    """timm's eval transform from the model's data config (size, interpolation, mean/std).

    A checkpoint written by ``retrofit finetune`` is evaluated exactly as its run evaluated it
    (the recorded data config: its ``--img-size``, crop and normalisation). Otherwise the whole
    photo is resized to the model's input size (timm ``crop_mode="squash"``, no crop), so an
    object that fills the frame stays in it.
    """
    from timm.data import create_transform, resolve_data_config

    recorded = getattr(model, "retrofit_data_config", None)
    if isinstance(recorded, dict) and recorded.get("input_size"):
        keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in keys}
        return create_transform(**config, is_training=False)
    config = resolve_data_config({}, model=model)
    config.update(crop_pct=1.0, crop_mode="squash")
    return create_transform(**config)


def predict(model: nn.Module, images: list[str | os.PathLike], top: int = 5) -> list[Prediction]:
    """Run ``model`` (eval mode, no grad) on image files; returns the top-``top`` classes of each.

    Raises :class:`RetrofitError` for a missing or unreadable image (including one over PIL's
    decompression-bomb limit of about 179 megapixels).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    from .images import to_rgb

    transform = eval_transform(model)
    batch = []
    for path in images:
        try:
            with warnings.catch_warnings():  # a large photo is fine; PIL's bomb *error* still stops it
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    batch.append(transform(to_rgb(im)))
        except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise RetrofitError(f"cannot read image {path}: {e}") from None
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.stack(batch).to(param.device, param.dtype)).float().cpu()
    finally:
        model.train(was_training)
    probs = logits.softmax(-1)
    k = min(top, logits.shape[-1])
    names = class_names(model)
    out = []
    for path, lg, pr in zip(images, logits, probs):
        values, idx = pr.topk(k)
        labels = [names[i] if names and i < len(names) else str(i) for i in idx.tolist()]
        out.append(Prediction(str(path), idx.tolist(), values.tolist(), lg, labels))
    return out
