"""Datasets and loaders for fine-tuning: ImageFolder trees or torchvision datasets, timm transforms.

* ImageFolder: ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``, or a train root
  plus ``val_data``. Class indices come from the train tree (sorted folder names) and the val
  tree is read with the same mapping.
* ``torchvision:NAME`` (``torchvision:CIFAR10``, ``torchvision:MNIST``, …): the dataset's
  train split and its test (or val) split, downloaded into ``dataset_root`` with ``download``.

Transforms come from the model's timm data config (``timm.data.resolve_data_config`` and
``create_transform``): mean/std, interpolation and crop are the model's, not written here.
Images are converted to RGB first, so greyscale sets work.

An unreadable image does not raise inside a loader worker (where the message would be buried
in a re-raised traceback): the dataset yields a :class:`BadImage` and :func:`collate` hands it
to the training loop, which stops naming the file or, with ``skip_bad_images``, counts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import RetrofitError
from ..images import to_rgb

TORCHVISION_PREFIX = "torchvision:"


@dataclass(frozen=True)
class BadImage:
    """An image that could not be decoded or transformed: ``path`` and the reason (one line)."""

    path: str
    reason: str


@dataclass
class Splits:
    """Train and validation datasets with their shared class list (index = label)."""

    train: Dataset
    val: Dataset
    classes: list[str]
    description: str


class ImageTree(Dataset):
    """An ImageFolder tree with a given class mapping; yields ``(image (3, H, W), label)`` or a :class:`BadImage`.

    Files are those ``torchvision.datasets.ImageFolder`` would take (its ``IMG_EXTENSIONS``,
    symlinks followed, sorted). Unlike ``make_dataset`` before torchvision 0.18, a class folder
    absent from this tree is not an error (a validation split may lack a class).
    """

    def __init__(self, root: Path, class_to_idx: dict[str, int], transform: Callable):
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

        self.root = root
        self.transform = transform
        self.samples: list[tuple[str, int]] = []
        for name, index in sorted(class_to_idx.items()):
            folder = root / name
            if not folder.is_dir():
                continue
            for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
                for f in sorted(files):
                    if has_file_allowed_extension(f, IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, f), index))
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadImage:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as im:
                return self.transform(to_rgb(im)), target
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError …
            return BadImage(path, _one_line(e))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def data_config(model: torch.nn.Module, img_size: int | None) -> dict[str, Any]:
    """timm's data config of ``model`` (input_size, interpolation, mean, std, crop_pct, crop_mode).

    ``img_size`` (pixels) overrides the square input size. torchvision models get timm's
    ImageNet defaults (224, bilinear, ImageNet mean/std, crop 0.875).
    """
    from timm.data import resolve_data_config

    args = {"input_size": (3, img_size, img_size)} if img_size else {}
    return dict(resolve_data_config(args, model=model))


def transforms(config: dict[str, Any], *, hflip: float, scale: Sequence[float], color_jitter: float,
               auto_augment: str | None = None, re_prob: float = 0.0, re_mode: str = "pixel",
               re_count: int = 1) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` from timm's ``create_transform`` for a data config.

    Train: random-resized crop with ``scale``, horizontal flip with probability ``hflip``,
    colour jitter ``color_jitter`` (timm drops it under ``auto_augment``, which has its own colour
    operations), timm's ``auto_augment`` string, random erasing (``re_prob``, ``re_mode``,
    ``re_count``, after normalisation); eval: resize to ``size / crop_pct`` then centre crop.
    Both map a PIL RGB image to a normalised ``(3, H, W)`` float tensor.
    """
    from timm.data import create_transform

    common = {k: _tuple(config[k]) for k in ("input_size", "interpolation", "mean", "std")}
    train = create_transform(**common, is_training=True, hflip=hflip, scale=tuple(scale), color_jitter=color_jitter,
                             auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count)
    return train, eval_transform(config)


def eval_transform(config: dict[str, Any]) -> Callable:
    """timm's eval transform for a data config: resize to ``size / crop_pct``, centre crop, normalise.

    The one evaluation transform of retrofit: fine-tuning validation and ``retrofit evaluate``
    both use it (as timm's ``validate.py`` does). ``config`` may come from JSON (lists for tuples).
    Maps a PIL RGB image to a normalised ``(3, H, W)`` float tensor.
    """
    from timm.data import create_transform

    common = {k: _tuple(config[k]) for k in ("input_size", "interpolation", "mean", "std")}
    return create_transform(**common, is_training=False, crop_pct=config["crop_pct"], crop_mode=config.get("crop_mode"))


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_splits(
    data: str,
    val_data: str | None,
    train_transform: Callable,
    eval_transform: Callable,
    *,
    dataset_root: str | None = None,
    download: bool = False,
) -> Splits:
    """Open the train and validation data.

    Raises :class:`RetrofitError`: missing or empty folders, a class folder without images,
    fewer than 2 classes, val classes absent from train, an unknown or missing torchvision
    dataset.
    """
    if data.startswith(TORCHVISION_PREFIX):
        if val_data is not None:
            raise RetrofitError("--val-data applies to an ImageFolder tree, not to a torchvision dataset")
        from .torchvision_data import torchvision_splits

        return torchvision_splits(data[len(TORCHVISION_PREFIX):], train_transform, eval_transform, dataset_root, download)
    root = Path(data)
    if root.exists() and not root.is_dir():
        raise RetrofitError(f"--data {root} is a file; give an ImageFolder folder or torchvision:NAME")
    if not root.is_dir():
        raise RetrofitError(f"data folder not found: {root}")
    if val_data is None:
        train_root, val_root = root / "train", root / "val"
        if not train_root.is_dir() or not val_root.is_dir():
            missing = train_root if not train_root.is_dir() else val_root
            raise RetrofitError(
                f"{missing} not found: expected {root}/train/<class>/<image> and {root}/val/<class>/<image>, "
                "or pass the train root as --data and the validation root as --val-data"
            )
    else:
        train_root, val_root = root, Path(val_data)
        if not val_root.is_dir():
            raise RetrofitError(f"validation folder not found: {val_root}")
    classes = _class_folders(train_root)
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise RetrofitError(f"{train_root} needs at least 2 class folders (<class>/<image>), found {found}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(_class_folders(val_root)) - set(classes))
    if unknown:
        raise RetrofitError(f"{val_root} has classes that {train_root} lacks: {', '.join(unknown[:5])}")
    train = ImageTree(train_root, class_to_idx, train_transform)
    val = ImageTree(val_root, class_to_idx, eval_transform)
    empty = sorted(set(classes) - {classes[t] for t in train.targets})
    if len(train) == 0:
        raise RetrofitError(f"no images in {train_root} (looked for {_extensions()} files in its class folders)")
    if empty:
        raise RetrofitError(f"class folder(s) without images in {train_root}: {', '.join(empty[:5])}")
    if len(val) == 0:
        raise RetrofitError(f"no images in {val_root} (looked for {_extensions()} files in its class folders)")
    return Splits(train, val, classes, f"{train_root} ({len(train)} images), {val_root} ({len(val)} images)")


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _extensions() -> str:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return "/".join(IMG_EXTENSIONS[:4]) + "/…"


@dataclass
class EvalData:
    """The images to evaluate on: a dataset yielding ``(image (3, H, W), label)`` or a :class:`BadImage`,
    the class names its labels index, and a one-line description."""

    dataset: Dataset
    classes: list[str]
    description: str


def open_eval_data(
    data: str,
    transform: Callable,
    *,
    classes: Sequence[str] | None = None,
    dataset_root: str | None = None,
    download: bool = False,
) -> EvalData:
    """Open evaluation images, labelled with a model's class list.

    ``data``: an ImageFolder root holding ``val/`` (the folder fine-tuning validates on), a
    folder of class folders, or ``torchvision:NAME`` (its test split). ``classes``: the model's
    class names, in head order (a fine-tuned checkpoint records them); every class of the data
    must be one of them. Without ``classes`` the labels follow ImageFolder's rule (sorted folder
    names) or the torchvision dataset's own list.

    Raises :class:`RetrofitError`: missing folder, no images, classes the model lacks, a
    torchvision dataset that is unknown, absent (without ``download``) or named differently.
    """
    if data.startswith(TORCHVISION_PREFIX):
        name = data[len(TORCHVISION_PREFIX):]
        from .torchvision_data import TorchvisionImages, dataset_root_folder, torchvision_class, torchvision_classes
        from .torchvision_data import torchvision_open

        cls, (_, test_args) = torchvision_class(name)
        root = dataset_root_folder(dataset_root)
        test = torchvision_open(cls, name, root, download, test_args)
        own = torchvision_classes(test, name)
        if classes is not None and list(classes) != own:
            raise RetrofitError(f"torchvision:{name} names its classes differently from the model "
                                f"({', '.join(own[:3])}, … vs {', '.join(list(classes)[:3])}, …)")
        return EvalData(TorchvisionImages(test, transform), own, f"torchvision:{name} test split ({len(test)} images)")
    root = Path(data)
    if not root.is_dir():
        raise RetrofitError(f"data folder not found: {root}" if not root.exists() else
                            f"--data {root} is a file; give a folder of class folders or torchvision:NAME")
    folder = root / "val" if (root / "val").is_dir() else root
    found = _class_folders(folder)
    if not found:
        raise RetrofitError(f"{folder} has no class folders (<class>/<image>)")
    names = list(classes) if classes is not None else found
    unknown = [c for c in found if c not in names]
    if unknown:
        raise RetrofitError(f"{folder} has classes the model lacks: {', '.join(unknown[:5])} "
                            f"(the model's: {', '.join(names[:5])}{', …' if len(names) > 5 else ''})")
    dataset = ImageTree(folder, {c: i for i, c in enumerate(names)}, transform)
    if len(dataset) == 0:
        raise RetrofitError(f"no images in {folder} (looked for {_extensions()} files in its class folders)")
    return EvalData(dataset, names, f"{folder} ({len(dataset)} images)")


def collate(batch: list[tuple[torch.Tensor, int] | BadImage]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[BadImage]]:
    """Stack good samples into ``(images (N, 3, H, W), labels (N,))``; bad ones are returned apart.

    Images and labels are None when every sample of the batch was bad.
    """
    good = [b for b in batch if not isinstance(b, BadImage)]
    bad = [b for b in batch if isinstance(b, BadImage)]
    if not good:
        return None, None, bad
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good], dtype=torch.long)
    return images, labels, bad


class ShardSampler(torch.utils.data.Sampler[int]):
    """Indices ``rank, rank + world, …`` in order: every sample evaluated exactly once across ranks.

    (``DistributedSampler`` pads with repeats so ranks get equal counts, which would count some
    validation images twice.)
    """

    def __init__(self, size: int, rank: int, world_size: int):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loaders(
    splits: Splits,
    *,
    batch_size: int,
    workers: int,
    rank: int,
    world_size: int,
    seed: int,
    pin_memory: bool,
) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """``(train_loader, val_loader, train_sampler)``; call ``train_sampler.set_epoch(e)`` each epoch.

    Train: ``DistributedSampler`` (also for one process: the order is a function of
    ``seed`` and the epoch alone, which makes ``--resume`` exact), last partial batch dropped
    (a batch of one breaks BatchNorm). Val: :class:`ShardSampler`, batches of ``2·batch_size``.

    Raises :class:`RetrofitError` when a rank would get fewer images than one batch.
    """
    per_rank = len(splits.train) // world_size
    if per_rank < batch_size:
        raise RetrofitError(
            f"{len(splits.train)} training images give {per_rank} per process, fewer than --batch-size {batch_size}; "
            "lower --batch-size"
        )
    sampler = DistributedSampler(splits.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    common = {"num_workers": workers, "collate_fn": collate, "pin_memory": pin_memory}
    train = DataLoader(splits.train, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
    val = DataLoader(splits.val, batch_size=2 * batch_size, sampler=ShardSampler(len(splits.val), rank, world_size), **common)
    return train, val, sampler
