"""torchvision datasets as fine-tuning and evaluation data (``--data torchvision:NAME``).

The dataset class, its train/test split arguments (``train=`` or ``split=``; ImageNet, which has
no test split, is read at ``val``), whether torchvision can download it, and the class names.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from ..errors import RetrofitError
from ..images import to_rgb
from .data import BadImage, Splits, _one_line

class TorchvisionImages(Dataset):
    """A torchvision dataset returning ``(PIL image, label)``, converted to RGB and transformed."""

    def __init__(self, dataset: Any, transform: Callable):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadImage:
        try:
            image, target = self.dataset[index]
            return self.transform(to_rgb(image)), int(target)
        except Exception as e:
            return BadImage(f"{type(self.dataset).__name__}[{index}]", _one_line(e))



def _can_download(cls: type) -> bool:
    """Whether torchvision can fetch this dataset: its constructor, or one it hands its arguments to
    (EMNIST → MNIST), takes ``download``. ImageNet's does not (its archives need a manual download)."""
    return any("download" in inspect.signature(c.__init__).parameters
               for c in cls.__mro__ if c not in (object, Dataset) and "__init__" in vars(c))



def torchvision_class(name: str) -> tuple[Any, tuple[dict[str, Any], dict[str, Any]]]:
    """The torchvision dataset class ``name`` and its ``(train, test)`` split arguments."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, Dataset)):
        raise RetrofitError(f"unknown torchvision dataset {name!r} (e.g. torchvision:CIFAR10, torchvision:MNIST)")
    params = inspect.signature(cls).parameters
    if "train" in params:
        return cls, ({"train": True}, {"train": False})
    if "split" in params:
        return cls, ({"split": "train"}, {"split": "test"})
    raise RetrofitError(f"torchvision dataset {name} has no train/test split argument; export it as an ImageFolder")



def torchvision_open(cls: Any, name: str, root: Path, download: bool, split: dict[str, Any]) -> Any:
    """One split of a torchvision dataset; a ``split="test"`` that does not exist (ImageNet) is its ``val``."""
    downloadable = _can_download(cls)
    if download and not downloadable:
        raise RetrofitError(f"torchvision cannot download {name}; place its files under {root} yourself "
                            "(see torchvision's documentation of the dataset) and run without --download")
    options = {"download": download} if downloadable else {}
    try:
        try:
            return cls(str(root), **options, **split)
        except ValueError as e:  # a split= dataset without a test split (ImageNet): its val split
            if split != {"split": "test"} or "'test'" not in str(e):
                raise
            return cls(str(root), **options, split="val")
    except RuntimeError as e:
        hint = ("; pass --download to fetch it" if downloadable and not download else
                "" if downloadable else f"; torchvision cannot download {name}: place its files there yourself")
        raise RetrofitError(f"torchvision dataset {name} not found under {root}{hint} ({_one_line(e)})") from None
    except (OSError, ValueError) as e:
        raise RetrofitError(f"cannot open torchvision dataset {name} under {root}: {_one_line(e)}") from None



def torchvision_classes(dataset: Any, name: str) -> list[str]:
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    if not classes:
        targets = getattr(dataset, "targets", None) or getattr(dataset, "labels", None)
        if targets is None:
            raise RetrofitError(f"torchvision dataset {name} does not say its classes")
        classes = [str(c) for c in sorted({int(t) for t in targets})]
    return classes



def dataset_root_folder(dataset_root: str | None) -> Path:
    return Path(dataset_root or Path.home() / ".cache" / "retrofit" / "datasets")



def torchvision_splits(
    name: str, train_transform: Callable, eval_transform: Callable, dataset_root: str | None, download: bool
) -> Splits:
    cls, (train_args, test_args) = torchvision_class(name)
    root = dataset_root_folder(dataset_root)
    train, val = (torchvision_open(cls, name, root, download, a) for a in (train_args, test_args))
    classes = torchvision_classes(train, name)
    if len(classes) < 2:
        raise RetrofitError(f"torchvision dataset {name} has fewer than 2 classes")
    return Splits(TorchvisionImages(train, train_transform), TorchvisionImages(val, eval_transform), classes,
                  f"torchvision:{name} under {root} ({len(train)} train, {len(val)} test images)")
