"""Weights files: reading a local state dict safely and loading it strictly, with one-line errors.

``.safetensors`` files, or ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``,
so a pickled object in a file is refused, never executed.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RetrofitError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_weights_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path` when it names an existing weights file of a known suffix.

    Raises :class:`RetrofitError` for a missing file, a directory, or another suffix (checked
    before any work, so a wrong ``--weights`` is the first thing a command says).
    """
    path = Path(path)
    if path.is_dir():
        raise RetrofitError(f"weights file {path} is a directory")
    if not path.is_file():
        raise RetrofitError(f"weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise RetrofitError(f"weights file {path} must end in one of {', '.join(WEIGHT_SUFFIXES)}")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file: ``.safetensors``, or ``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``.

    Unwraps a top-level ``state_dict`` or ``model`` key and strips a ``module.`` prefix (DDP).
    Raises :class:`RetrofitError` when the file is missing, unreadable, holds no tensors, or holds
    NaN/inf values (a damaged file or a diverged run: loading it would only yield NaN outputs).
    """
    path = check_weights_path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
            if _is_retrofit_checkpoint(path):
                raise RetrofitError(
                    f"{path} is a retrofit checkpoint, not base weights; use it directly as the TARGET of "
                    "predict/report/finetune, or retrofit.load_checkpoint()"
                )
        else:
            with warnings.catch_warnings():  # a plain pickle (protocol 4/5) makes torch warn before refusing it
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except RetrofitError:
        raise
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip (PK…); a pickle starts with its PROTO opcode (0x80); anything else is damaged
        if head[:2] != b"PK" and head[:1] != b"\x80":
            raise RetrofitError(f"cannot read weights file {path}: not a PyTorch weights file") from e
        # the weights-only unpickler refused an object (a whole nn.Module, a plain pickle, a crafted file)
        raise RetrofitError(
            f"weights file {path} holds pickled Python objects, not a plain state dict; retrofit reads weights "
            "with torch.load(weights_only=True), so nothing in it was executed; re-save it with "
            "torch.save(model.state_dict(), path)"
        ) from e
    except EOFError as e:
        raise RetrofitError(f"cannot read weights file {path}: it is empty or truncated") from e
    except Exception as e:  # the readers raise many types for a damaged file
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch (torch.save)"
        raise RetrofitError(
            f"cannot read weights file {path}: not a {kind} weights file, or damaged ({type(e).__name__}: {_first_line(e)})"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RetrofitError(f"weights file {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    broken = [k for k, v in obj.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise RetrofitError(
            f"weights file {path} holds NaN or infinite values in {len(broken)} tensor(s) "
            f"({', '.join(broken[:3])}{', …' if len(broken) > 3 else ''}); it is damaged or from a diverged run"
        )
    return obj


def _is_retrofit_checkpoint(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "retrofit.recipe" in (f.metadata() or {})


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with one readable error on any mismatch.

    The error names up to 5 missing and 5 unexpected keys, or the first shape mismatches.
    BatchNorm ``num_batches_tracked`` counters may be absent (files of PyTorch < 0.4.1, and
    exporters that drop them): PyTorch itself fills them in on load, and so does this.
    """
    own = model.state_dict()
    state = dict(state)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = v.clone()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        # name weights first: BatchNorm counters say nothing about which architecture a file is for
        missing.sort(key=lambda k: k.endswith("num_batches_tracked"))
        unexpected.sort(key=lambda k: k.endswith("num_batches_tracked"))
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])}{', …' if len(unexpected) > 5 else ''})"
            )
        raise RetrofitError(f"keys of {source} do not match the architecture: {'; '.join(parts)}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise RetrofitError(f"shapes of {source} do not match the architecture: {', '.join(bad[:5])}")
    # A safetensors file has no per-module version metadata; modules that check it on load
    # (torchvision's MNASNet) get the version of the architecture the file was checked against.
    state = OrderedDict(state)
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
