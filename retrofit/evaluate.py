"""Dataset-level evaluation of a model or checkpoint, and the comparison of two on the same images.

The anchor is timm's ``validate.py``: the eval transform comes from the model's data config and
is the one fine-tuning validates with (:func:`retrofit.train.data.eval_transform`). A checkpoint
written by ``retrofit finetune`` records its data config (input size, interpolation, mean/std,
crop) and its class names; both are used, so a run's ``best.safetensors`` evaluates to the top-1
its ``metrics.csv`` reports. Other models get timm's data config and ImageFolder's labels
(sorted class-folder names).

Loss is mean cross-entropy (no label smoothing), top-1/top-5 are fractions in [0, 1], as in
``metrics.csv``. Two classifiers on the same images are compared with McNemar's exact test
(:func:`retrofit.stats.mcnemar_exact`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RetrofitError
from .stats import mcnemar_exact

__all__ = ["Comparison", "Evaluation", "compare", "evaluate", "mcnemar_exact", "model_data_config", "write_predictions"]


@dataclass
class Evaluation:
    """One model on one set of images.

    Per image (dataset order): ``paths`` (file path, or ``Name[index]`` for torchvision data),
    ``labels`` and ``predicted`` (class indices into ``classes``), ``probability`` (softmax
    probability of the predicted class). Totals: ``loss`` (mean cross-entropy), ``top1`` and
    ``top5`` (fractions; top-5 is top-k with k = min(5, classes)).
    """

    target: str
    data: str
    classes: list[str]
    data_config: dict[str, Any]
    paths: list[str]
    labels: list[int]
    predicted: list[int]
    probability: list[float]
    loss: float
    top1: float
    top5: float

    @property
    def images(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> list[bool]:
        return [p == y for p, y in zip(self.predicted, self.labels)]

    def per_class(self) -> list[dict[str, Any]]:
        """``{"class", "images", "top1"}`` per class of the model (top1 None for a class without images)."""
        counts = [0] * len(self.classes)
        hits = [0] * len(self.classes)
        for y, ok in zip(self.labels, self.correct):
            counts[y] += 1
            hits[y] += ok
        return [{"class": name, "images": n, "top1": h / n if n else None}
                for name, n, h in zip(self.classes, counts, hits)]

    def to_dict(self, per_class: bool = False) -> dict[str, Any]:
        """The JSON of ``retrofit evaluate --json``: target, data, images, top1, top5, loss (and per_class)."""
        out = {"target": self.target, "data": self.data, "images": self.images,
               "top1": self.top1, "top5": self.top5, "loss": self.loss}
        if per_class:
            out["per_class"] = self.per_class()
        return out


@dataclass
class Comparison:
    """Two evaluations on the same images: ``first_only`` (b) images only the first gets right,
    ``second_only`` (c) only the second, McNemar's exact two-sided ``p_value``."""

    first: Evaluation
    second: Evaluation
    first_only: int
    second_only: int
    p_value: float

    @property
    def top1_difference(self) -> float:
        """``second.top1 − first.top1`` (a fraction)."""
        return self.second.top1 - self.first.top1

    def to_dict(self, per_class: bool = False) -> dict[str, Any]:
        return {"targets": [self.first.to_dict(per_class), self.second.to_dict(per_class)],
                "top1_difference": self.top1_difference,
                "mcnemar": {"first_only_correct": self.first_only, "second_only_correct": self.second_only,
                            "p": self.p_value}}


def model_data_config(model: nn.Module) -> dict[str, Any]:
    """The data config to evaluate ``model`` with: the one a fine-tuning run recorded in the
    checkpoint, else timm's (:func:`timm.data.resolve_data_config`; ImageNet defaults for
    torchvision models)."""
    from .train.data import data_config

    recorded = getattr(model, "retrofit_data_config", None)
    if isinstance(recorded, dict) and recorded.get("input_size"):
        return dict(recorded)
    return data_config(model, None)


def recorded_classes(model: nn.Module) -> list[str] | None:
    """Class names a fine-tuning run recorded in the checkpoint (head order), else None."""
    names = getattr(model, "retrofit_class_names", None)
    return list(names) if names else None


def evaluate(
    target: str | os.PathLike | nn.Module,
    data: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    dataset_root: str | None = None,
    download: bool = False,
    console: Any = None,
    name: str | None = None,
) -> Evaluation:
    """Evaluate a model name, a retrofit checkpoint, or a model on ``data``.

    Args:
        target: model name (timm, ``torchvision:``, ``hf-hub:``; with ``weights`` /
            ``pretrained``), ``*.safetensors`` checkpoint, or an ``nn.Module`` taking
            ``(N, 3, H, W)`` and returning ``(N, classes)`` logits.
        data: ImageFolder root with ``val/``, a folder of class folders, or
            ``torchvision:NAME`` (test split); see :func:`retrofit.train.data.open_eval_data`.
        batch_size: images per forward pass; workers: DataLoader processes (None: min(4, CPUs)).
        device: ``auto`` (CUDA when present), ``cuda`` or ``cpu``; precision: ``auto`` (bf16
            autocast on CUDA, as fine-tuning validates; fp32 on CPU), ``bf16`` or ``fp32``.
        console: a ``rich.console.Console`` for the progress bar (None: no bar).
        name: how the target is named in the result (default: ``str(target)``).

    Raises:
        RetrofitError: unknown model or bad checkpoint, data that cannot be opened, classes the
            model lacks, more classes than the head has outputs, an unreadable image, bad
            batch size / worker count / device / precision.
    """
    from .checkpoint import load_target
    from .train.config import DEVICES, PRECISIONS, default_workers, max_workers
    from .train.data import eval_transform, open_eval_data

    workers = default_workers() if workers is None else workers
    if batch_size < 1:
        raise RetrofitError(f"--batch-size must be ≥ 1, got {batch_size}")
    if not 0 <= workers <= max_workers():
        raise RetrofitError(f"--workers must be between 0 and {max_workers()} (4 × this machine's CPUs), got {workers}")
    for setting, value, options in (("device", device, DEVICES), ("precision", precision, PRECISIONS)):
        if value not in options:
            raise RetrofitError(f"unknown {setting} {value!r}; choose one of: {', '.join(options)}")
    model = target if isinstance(target, nn.Module) else load_target(
        target, pretrained=pretrained, weights=weights, num_classes=num_classes
    )
    config = model_data_config(model)
    opened = open_eval_data(data, eval_transform(config), classes=recorded_classes(model),
                            dataset_root=dataset_root, download=download)
    return _run(model, opened, name or str(target), config, batch_size=batch_size, workers=workers,
                device=device, precision=precision, console=console)


def _run(model: nn.Module, opened: Any, name: str, config: dict[str, Any], *, batch_size: int, workers: int,
         device: str, precision: str, console: Any) -> Evaluation:
    from torch.utils.data import DataLoader

    from .train.data import collate
    from .train.distributed import resolve_device
    from .train.model import num_classes

    outputs = num_classes(model)
    if len(opened.classes) > outputs:
        raise RetrofitError(f"the data has {len(opened.classes)} classes but {name} has {outputs} outputs")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" or (precision == "auto" and cuda)
                else contextlib.nullcontext())
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = model.to(dev, memory_format=memory_format).eval()
    loader = DataLoader(opened.dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=cuda)
    labels, predicted, probability = [], [], []
    loss_sum, top_k_hits = 0.0, 0
    k = min(5, outputs)
    progress = _progress(console, name, len(loader))
    with progress or contextlib.nullcontext(), torch.no_grad():
        task = progress.add_task("", total=len(loader)) if progress else None
        for images, targets, bad in loader:
            if bad:
                raise RetrofitError(f"cannot read image {bad[0].path} ({bad[0].reason}); fix or remove it")
            with autocast:
                logits = model(images.to(dev, non_blocking=True, memory_format=memory_format))
            logits, targets = logits.float(), targets.to(dev)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            top_k_hits += int(logits.topk(k, dim=1).indices.eq(targets[:, None]).any(dim=1).sum())
            prob, pred = logits.softmax(dim=1).max(dim=1)
            labels += targets.tolist()
            predicted += pred.tolist()
            probability += prob.tolist()
            if progress:
                progress.advance(task)
    n = len(labels)
    if n == 0:
        raise RetrofitError(f"{opened.description} holds no images to evaluate")
    top1 = sum(p == y for p, y in zip(predicted, labels)) / n
    return Evaluation(name, opened.description, list(opened.classes), _jsonable(config), _paths(opened.dataset),
                      labels, predicted, probability, loss_sum / n, top1, top_k_hits / n)


def _progress(console: Any, name: str, total: int) -> Any:
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(f"evaluating {name}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                    TimeRemainingColumn(), console=console, transient=True)


def _paths(dataset: Any) -> list[str]:
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return [path for path, _ in samples]
    inner = type(getattr(dataset, "dataset", dataset)).__name__
    return [f"{inner}[{i}]" for i in range(len(dataset))]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def compare(first: Evaluation, second: Evaluation) -> Comparison:
    """McNemar's exact test of two evaluations of the same images.

    Raises :class:`RetrofitError` when the class names or the images (paths, labels) differ.
    """
    if first.classes != second.classes:
        raise RetrofitError(f"{first.target} and {second.target} name their classes differently; "
                            "a comparison needs two models of the same classes")
    if first.paths != second.paths or first.labels != second.labels:
        raise RetrofitError(f"{first.target} and {second.target} were evaluated on different images")
    b = sum(x and not y for x, y in zip(first.correct, second.correct))
    c = sum(y and not x for x, y in zip(first.correct, second.correct))
    return Comparison(first, second, b, c, mcnemar_exact(b, c))


def predictions_csv(evaluations: Sequence[Evaluation]) -> str:
    """One row per image: ``path, label, predicted, probability`` (class names; probability of the
    predicted class), and ``predicted_2, probability_2`` for a second evaluation of the same images.
    A prediction past the data's classes (a 1000-class head on a 10-class folder) is written as its index."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    first = evaluations[0]
    header = ["path", "label", "predicted", "probability"]
    for i in range(2, len(evaluations) + 1):
        header += [f"predicted_{i}", f"probability_{i}"]
    writer.writerow(header)
    for row in range(first.images):
        cells = [first.paths[row], first.classes[first.labels[row]]]
        for e in evaluations:
            index = e.predicted[row]
            cells += [e.classes[index] if index < len(e.classes) else str(index), f"{e.probability[row]:.6f}"]
        writer.writerow(cells)
    return buffer.getvalue()


def write_predictions(path: str | os.PathLike, evaluations: Sequence[Evaluation], overwrite: bool = True) -> None:
    """Write :func:`predictions_csv` to ``path`` atomically (a kill leaves the old file or the new one).

    Raises :class:`RetrofitError` when ``path`` exists and ``overwrite`` is False (also when it appeared
    while the evaluation ran), or cannot be written."""
    from pathlib import Path

    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(path), predictions_csv(evaluations).encode(), overwrite=overwrite)
