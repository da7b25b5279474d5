"""Adapter-only checkpoints: the inserted gates (and the head, when it was trained), the recipe, and the
digest of the base weights they apply to.

A retrofit adds a few thousand parameters to a network of millions; when only those (and the head) are
trained — ``retrofit finetune --train blocks`` or ``--train head`` — everything else *is* the base model's
weights, which the user already has. An adapter file holds, like HF PEFT's ``adapter_model.safetensors``,
only what was added or trained, plus in the safetensors metadata:

* ``retrofit.recipe`` — the full model's recipe (:class:`~retrofit.recipe.Recipe`), so the architecture
  is rebuilt exactly as from a full checkpoint;
* ``retrofit.adapter`` — JSON: ``format`` (``retrofit.adapter/1``), ``base_sha256`` (the
  :func:`~retrofit.checkpoint.tensors_digest` of every other tensor of the model's state dict),
  ``base_tensors`` (their count) and ``head`` (the head's module path when it is in the file, else null);
* ``retrofit.sha256`` — the digest of the adapter's tensors, recipe and adapter record.

:func:`retrofit.load_checkpoint` ``(adapter, base=...)`` rebuilds the architecture, loads the base's
tensors, then the adapter's, and refuses a base whose tensors do not give ``base_sha256``: a round trip
is exact, and an adapter never lands on weights it was not trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .errors import RetrofitError

if TYPE_CHECKING:  # torch is imported where it is used: `is_adapter` serves the CLI before torch loads
    import torch
    from torch import nn

    #: What ``base=`` accepts: a weights file or full retrofit checkpoint, a model, or a state dict.
    Base = Union[str, os.PathLike, nn.Module, Mapping[str, torch.Tensor]]

ADAPTER_KEY = "retrofit.adapter"
ADAPTER_FORMAT = "retrofit.adapter/1"


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an adapter file (read from its safetensors header only; no torch, no tensors).

    False for a missing file, a full checkpoint or anything that is not safetensors.
    """
    return ADAPTER_KEY in _header_metadata(Path(path))


def _header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (8-byte little-endian header length, then JSON)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return {}
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def adapter_keys(model: nn.Module, head: bool) -> list[str]:
    """State-dict keys of every inserted gate (:class:`~retrofit.blocks.ChannelGate`) and, with ``head``, of
    the classifier (:func:`retrofit.train.model.head`), in state-dict order."""
    from .blocks import ChannelGate

    prefixes = [n + "." for n, m in model.named_modules() if isinstance(m, ChannelGate)]
    if head:
        from .train.model import head as classifier

        prefixes.append(classifier(model)[0] + ".")
    return [k for k in model.state_dict() if k.startswith(tuple(prefixes))] if prefixes else []


def base_state(base: Base) -> tuple[dict[str, torch.Tensor], str]:
    """``(state dict, description)`` of a base: a weights file (``.safetensors``, ``.pth``/``.pt``/``.bin``,
    read by :func:`retrofit.weights.read_state_dict`), a full retrofit checkpoint, a model or a state dict.

    Raises :class:`RetrofitError` for an unreadable file, an adapter given as base, or another type.
    """
    from torch import nn

    if isinstance(base, nn.Module):
        return dict(base.state_dict()), f"the given {type(base).__name__}"
    if isinstance(base, Mapping):
        return dict(base), "the given state dict"
    if not isinstance(base, (str, os.PathLike)):
        raise RetrofitError(f"base= takes a weights file, a retrofit checkpoint, a model or a state dict, "
                            f"not {type(base).__name__}")
    path = Path(base)
    metadata = _header_metadata(path) if path.suffix == ".safetensors" else {}
    if ADAPTER_KEY in metadata:
        raise RetrofitError(f"the base {path} is itself an adapter; give the base weights it applies to")
    if "retrofit.recipe" in metadata:
        from .checkpoint import load_checkpoint

        return dict(load_checkpoint(path).state_dict()), str(path)
    from .weights import read_state_dict

    return read_state_dict(path), str(path)


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    head: bool = False,
    base: Base | None = None,
    overwrite: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save only ``model``'s inserted gates (and with ``head`` its classifier) as an adapter, atomically.

    Every other tensor of the state dict is the base's: its digest is recorded, and
    :func:`retrofit.load_checkpoint` ``(path, base=...)`` refuses a base that does not reproduce it.
    The recipe is proved as by :func:`retrofit.save_checkpoint` before the first write.

    Args:
        model: a retrofitted model (or, with ``head``, any model :func:`retrofit.save_checkpoint` takes).
        path: target file (``.safetensors``).
        head: also store the classifier (trained or replaced: ``retrofit finetune`` always trains it).
        base: when given (see :func:`base_state`), every tensor outside the adapter must equal the base's
            exactly, so a model whose backbone was trained is refused instead of saved as an adapter that
            no base rebuilds.
        overwrite: when False, an existing ``path`` is an error.
        extra: JSON-ready data for the recipe's ``extra`` (e.g. fine-tuning settings).

    Returns: the path written. Raises :class:`RetrofitError` (nothing written): nothing to store (no
    gates, no head), a base that differs or does not fit, an existing ``path`` without ``overwrite``, a
    recipe that does not rebuild the model.
    """
    from safetensors.torch import save

    from .checkpoint import DIGEST_KEY, RECIPE_KEY, _contiguous_unshared, atomic_write_bytes, check_writable
    from .checkpoint import tensors_digest
    from .recipe import recipe_of
    from .verify import check_rebuild

    path = check_writable(path, overwrite)
    keys = adapter_keys(model, head)
    if not keys:
        raise RetrofitError(f"{type(model).__name__} has no inserted blocks with weights; an adapter of it would be "
                            "empty (pass head=True / fine-tune with --train head to keep its head)")
    recipe = recipe_of(model, extra)
    check_rebuild(model, recipe)
    state = model.state_dict()
    adapted = set(keys)
    backbone = {k: v for k, v in state.items() if k not in adapted}
    if base is not None:
        _check_same_backbone(backbone, *base_state(base))
    tensors = _contiguous_unshared({k: state[k] for k in keys})
    from .train.model import head as classifier

    info = json.dumps({"format": ADAPTER_FORMAT, "base_sha256": tensors_digest(backbone),
                       "base_tensors": len(backbone), "head": classifier(model)[0] if head else None}, sort_keys=True)
    recipe_json = recipe.to_json()
    metadata = {RECIPE_KEY: recipe_json, ADAPTER_KEY: info, DIGEST_KEY: tensors_digest(tensors, recipe_json + info)}
    atomic_write_bytes(path, save(tensors, metadata=metadata), overwrite=overwrite)
    return path


def _check_same_backbone(backbone: dict[str, torch.Tensor], base: dict[str, torch.Tensor], name: str) -> None:
    """Every backbone tensor equals the base's (BatchNorm counters the base lacks excepted)."""
    import torch

    for key, value in backbone.items():
        if key not in base:
            if key.endswith("num_batches_tracked"):
                continue
            raise RetrofitError(f"{name} has no tensor {key}; it is not the base of this model")
        other = base[key]
        if other.shape != value.shape:
            raise RetrofitError(f"{name} is not the base of this model: {key} is {tuple(other.shape)} there, "
                                f"{tuple(value.shape)} here")
        if not torch.equal(other.to(value.device, value.dtype), value):
            raise RetrofitError(f"{key} differs from {name}: the model's backbone was trained, so an adapter "
                                "(gates and head only) would not rebuild it; save a full checkpoint instead")


def apply_adapter(model: nn.Module, path: Path, info_json: str, tensors: dict[str, torch.Tensor], base: Base,
                  source: dict[str, Any]) -> None:
    """Load ``base`` and then the adapter's ``tensors`` into ``model`` (rebuilt from the adapter's recipe).

    Raises :class:`RetrofitError` (one line): a damaged adapter record, a base of another architecture
    (keys or shapes that do not fit), a base whose tensors do not give the recorded digest.
    """
    from .checkpoint import tensors_digest
    from .weights import load_state_dict_strict

    try:
        info = json.loads(info_json)
        if info.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"format {info.get('format')!r}")
        recorded = str(info["base_sha256"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise RetrofitError(f"the adapter record of {path} is damaged or of another version ({e})") from None
    state, name = base_state(base)
    own = model.state_dict()
    what = f"{source.get('model')} ({source.get('zoo')})"
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise RetrofitError(f"{path} holds tensors its own recipe's model lacks ({', '.join(unknown[:3])})")
    needed = [k for k in own if k not in tensors]
    missing = [k for k in needed if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise RetrofitError(f"{name} is not a base for this adapter, which applies to {what} weights: it lacks "
                            f"{len(missing)} of their tensors ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''})")
    wrong = [k for k in needed if k in state and state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise RetrofitError(f"{name} is not a base for this adapter, which applies to {what} weights: {k} is "
                            f"{tuple(state[k].shape)} there but {tuple(own[k].shape)} in {source.get('model')}")
    merged = {k: state[k] for k in needed if k in state}
    merged.update(tensors)
    load_state_dict_strict(model, merged, f"{name} with adapter {path.name}")
    adapted = set(tensors)
    got = tensors_digest({k: v for k, v in model.state_dict().items() if k not in adapted})
    if got != recorded:
        raise RetrofitError(f"{name} is not the base this adapter was made from (digest of its weights "
                            f"{got[:12]}…, the adapter's base {recorded[:12]}…; made from {what} with weights "
                            f"{source.get('weights')!r})")


def head_was_trained(recipe: Any, metadata: Mapping[str, str]) -> bool:
    """Whether a checkpoint's head belongs in an adapter of it: an adapter that holds one, or a checkpoint
    ``retrofit finetune`` wrote (every fine-tuning mode trains the head)."""
    if ADAPTER_KEY in metadata:
        try:
            return json.loads(metadata[ADAPTER_KEY]).get("head") is not None
        except (ValueError, AttributeError):
            return False
    return isinstance(recipe.extra, dict) and isinstance(recipe.extra.get("finetune"), dict)


def backbone_trained(recipe: Any) -> bool:
    """Whether a checkpoint written by ``retrofit finetune`` trained its backbone (``--train full`` with some
    epochs not frozen): an adapter of it would apply to no base the user has."""
    finetune = recipe.extra.get("finetune") if isinstance(recipe.extra, dict) else None
    settings = finetune.get("settings") if isinstance(finetune, dict) else None
    if not isinstance(settings, dict):
        return False
    if settings.get("train", "full") != "full":
        return False
    return int(settings.get("freeze_backbone_epochs") or 0) < int(finetune.get("epoch") or settings.get("epochs") or 0)


def resave(source: str | os.PathLike, output: str | os.PathLike, *, adapter: bool,
           weights: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``retrofit save``: write a checkpoint (full, or with ``adapter`` adapter-only) from a checkpoint.

    ``source`` is a full checkpoint or an adapter; an adapter needs ``weights`` (its base). With
    ``adapter`` and a full checkpoint, ``weights`` (optional) is checked to be the checkpoint's base
    exactly. The head is stored when the source's was trained (:func:`head_was_trained`); the
    recipe's ``extra`` (class names, data config of a fine-tuning run) is kept.

    Returns the report: ``source, output, kind ("adapter"|"checkpoint"), tensors, params`` (parameters
    stored)``, bytes, head``.
    Raises :class:`RetrofitError` (nothing written): a model name as source, an adapter without base,
    ``weights`` with a full checkpoint and no ``adapter``, a checkpoint whose backbone was fine-tuned
    (as adapter, without a base to check), an existing output without ``overwrite``, and every error
    of :func:`retrofit.load_checkpoint` / :func:`save_adapter`.
    """
    from .checkpoint import _open, check_writable, is_checkpoint, load_checkpoint, save_checkpoint
    from .lock import output_lock

    source, output = Path(source), Path(output)
    if not is_checkpoint(source):
        raise RetrofitError(f"SOURCE {source} is not a checkpoint (.safetensors); retrofit save rewrites a retrofit "
                            "checkpoint or adapter (for a model name, use retrofit add)")
    recipe, metadata = _open(source)
    from_adapter = ADAPTER_KEY in metadata
    if from_adapter and weights is None:
        raise RetrofitError(f"{source} is an adapter: pass --weights with the base weights it applies to "
                            f"({recipe.source.get('model')} with weights {recipe.source.get('weights')!r})")
    if not from_adapter and weights is not None and not adapter:
        raise RetrofitError(f"--weights applies to an adapter SOURCE or with --adapter; {source} is a full checkpoint")
    if adapter and not from_adapter and weights is None and backbone_trained(recipe):
        raise RetrofitError(f"{source} was fine-tuned with --train full: its backbone changed, so an adapter of it "
                            "applies to no base you have; fine-tune with --train blocks or --train head, or pass "
                            "--weights to check a base")
    output = check_writable(output, overwrite)
    if output.suffix != ".safetensors":
        raise RetrofitError(f"output {output} must be a file name ending in .safetensors")
    for given, what in ((source, "SOURCE"), (weights, "--weights")):
        if given is not None and output.exists() and output.resolve() == Path(given).resolve():
            raise RetrofitError(f"output {output} is the {what} file itself; write to another file")
    head = head_was_trained(recipe, metadata)
    with output_lock(output, "-o"):
        check_writable(output, overwrite)
        model = load_checkpoint(source, base=weights if from_adapter else None)
        extra = dict(recipe.extra or {})
        if adapter:
            save_adapter(model, output, head=head, base=None if from_adapter else weights, overwrite=overwrite,
                         extra=extra)
            keys = adapter_keys(model, head)
        else:
            save_checkpoint(model, output, overwrite=overwrite, extra=extra)
            keys = list(model.state_dict())
    stored = set(keys)
    return {
        "source": str(source), "output": str(output), "kind": "adapter" if adapter else "checkpoint",
        "tensors": len(keys), "params": sum(p.numel() for n, p in model.named_parameters() if n in stored),
        "bytes": output.stat().st_size, "head": head if adapter else True,
    }
