"""The limits of every numeric option, in one place.

Torch-free, so the CLI checks every number before it imports torch or builds a model: a value
out of range is a one-line error in well under a second, not after seconds of loading. Beyond
these limits a value is a typo or an attack, never a plan: ``--img-size 100000`` used to get the
process OOM-killed by one probe image, ``--epochs 99999999999999999999`` trained forever at a flat
learning rate.
"""

from __future__ import annotations

from typing import Any, Sequence

from .errors import RetrofitError

#: Largest image side in pixels: ``--img-size`` (finetune) and H, W of ``--input-size`` (add, sites, report).
MAX_IMAGE_SIDE = 4096

#: Most input channels of ``--input-size``.
MAX_CHANNELS = 64

#: Most epochs of a fine-tuning run (timm's longest ImageNet recipes from scratch run 600).
MAX_EPOCHS = 10_000

#: Largest ``--batch-size`` (images per step and process).
MAX_BATCH_SIZE = 65_536

#: Most ``--accum-steps`` (micro-batches per optimizer step).
MAX_ACCUM_STEPS = 1024

#: Largest warm-up, as a fraction of the run: a longer one is capped here with a one-line warning
#: (``--epochs 1`` with the default one warm-up epoch would otherwise warm up until its last step).
MAX_WARMUP_FRACTION = 0.5

#: Largest SE ``--reduction`` r.
MAX_REDUCTION = 1024

#: Largest SE ``--rd-divisor`` (the hidden width is a multiple of it, at least it).
MAX_RD_DIVISOR = 1024

#: Most classes of ``--num-classes`` (ImageNet-21k has 21,843; a classifier beyond this is a typo).
MAX_CLASSES = 1_000_000

#: Largest ECA ``--kernel-size`` k (odd; a site's channel count is the other bound, checked on the model).
MAX_KERNEL_SIZE = 1023

#: Most se-gc ``--groups`` (they must also divide a site's channel count, checked on the model).
MAX_GROUPS = 4096

#: Largest ``--stages`` number (stride 4 → 1 … stride 32 → 4; timm's ``feature_info`` has fewer).
MAX_STAGE = 16

#: Largest ``--seed`` (NumPy and torch take 64-bit seeds).
MAX_SEED = 2**63 - 1


def check_range(flag: str, value: Any, low: int | float, high: int | float, unit: str = "") -> None:
    """Raise ``RetrofitError("FLAG must be between LOW and HIGH[ unit], got VALUE")`` unless low ≤ value ≤ high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RetrofitError(f"{flag} must be between {low} and {high}{' ' + unit if unit else ''}, got {value}")


def check_block_numbers(*, reduction: Any = None, kernel_size: Any = None, groups: Any = None,
                        stages: Sequence[int] | None = None, rd_divisor: Any = None, num_classes: Any = None) -> None:
    """The numbers of a block insertion, before any model is built; None means not given.

    ``kernel_size``: one int or one per stage, each odd (ECA's convolution is centred: an even k
    would shift the channel neighbourhood).

    Raises:
        RetrofitError: a value out of range, or an even ECA kernel size.
    """
    if reduction is not None:
        check_range("--reduction", reduction, 1, MAX_REDUCTION)
    for k in ([kernel_size] if isinstance(kernel_size, int) else kernel_size or []):
        check_range("--kernel-size", k, 1, MAX_KERNEL_SIZE)
        if k % 2 == 0:
            raise RetrofitError(f"--kernel-size must be odd (ECA's 1-D convolution is centred on each channel), got {k}")
    if groups is not None:
        check_range("--groups", groups, 1, MAX_GROUPS)
    if rd_divisor is not None:
        check_range("--rd-divisor", rd_divisor, 1, MAX_RD_DIVISOR)
    if num_classes is not None:
        check_range("--num-classes", num_classes, 1, MAX_CLASSES)
    for s in stages or []:
        check_range("--stages", s, 1, MAX_STAGE)
