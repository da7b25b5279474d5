"""The options of ``retrofit finetune`` that ``retrofit ablate`` shares: data, recipe, device.

Declared once here, so the two commands cannot drift; :func:`recipe_settings` turns their
parsed values into :class:`retrofit.train.FinetuneConfig` keyword arguments.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Optional, get_args

import typer

from .add import ExcludeOpt, GroupsOpt, IncludeOpt, InitOpt, NoPretrainedOpt, WeightsOpt
from .app import fail

DATA_PANEL, RECIPE_PANEL, DEVICE_PANEL, OUTPUT_PANEL = "Data", "Training recipe", "Device", "Output"
INSERTION_PANEL = "Model and insertion (with a model name)"


def in_panel(option: Any, panel: str) -> Any:
    """A copy of a shared ``Annotated[type, typer.Option(...)]`` shown in help panel ``panel``."""
    base, info = get_args(option)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[base, info]


Init, Groups, Include, Exclude, Weights, NoPretrained = (
    in_panel(option, INSERTION_PANEL) for option in (InitOpt, GroupsOpt, IncludeOpt, ExcludeOpt, WeightsOpt, NoPretrainedOpt)
)
Data = Annotated[str, typer.Option(
    "--data", rich_help_panel=DATA_PANEL, help="ImageFolder root with train/<class>/… and val/<class>/… (or the train root, with --val-data), "
                   "or torchvision:NAME, e.g. torchvision:CIFAR10.")]
ValData = Annotated[Optional[Path], typer.Option("--val-data", rich_help_panel=DATA_PANEL, help="Validation ImageFolder root (then --data is the train root).")]
Epochs = Annotated[int, typer.Option("--epochs", rich_help_panel=RECIPE_PANEL, help="Epochs; the cosine schedule spans all of them.")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", rich_help_panel=RECIPE_PANEL, help="Images per step and process.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", rich_help_panel=DATA_PANEL, help="Square input side in pixels (default: the model's).")]
Lr = Annotated[float, typer.Option("--lr", rich_help_panel=RECIPE_PANEL, help="Peak learning rate of the backbone.")]
Optimizer = Annotated[str, typer.Option("--optimizer", rich_help_panel=RECIPE_PANEL, help="adamw or sgd (Nesterov momentum).")]
MinLr = Annotated[float, typer.Option("--min-lr", rich_help_panel=RECIPE_PANEL, help="Learning rate at the end of the cosine schedule.")]
WarmupEpochs = Annotated[float, typer.Option("--warmup-epochs", rich_help_panel=RECIPE_PANEL, help="Linear warmup length in epochs (may be fractional).")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", rich_help_panel=RECIPE_PANEL, help="Decoupled (AdamW) or L2 (SGD) decay; never on norms, biases, gates.")]
Momentum = Annotated[float, typer.Option("--momentum", rich_help_panel=RECIPE_PANEL, help="SGD momentum.")]
LabelSmoothing = Annotated[float, typer.Option("--label-smoothing", rich_help_panel=RECIPE_PANEL, help="Label smoothing of the training loss.")]
HeadLrMult = Annotated[Optional[float], typer.Option(
    "--head-lr-mult", rich_help_panel=RECIPE_PANEL, show_default="10",
    help="Learning-rate factor of the classifier head (a new one when the data has other classes).")]
BlockLrMult = Annotated[Optional[float], typer.Option(
    "--block-lr-mult", rich_help_panel=RECIPE_PANEL, show_default="1",
    help="Learning-rate factor of the inserted SE/ECA blocks (measured: at 10, Adam moves the zero-initialised "
         "gates so fast that they pull the pretrained network off course; docs/results.md).")]
BlockWarmupEpochs = Annotated[Optional[float], typer.Option(
    "--block-warmup-epochs", rich_help_panel=RECIPE_PANEL, show_default="0",
    help="Ramp the inserted blocks' learning rate up from 0 over these epochs (on top of --warmup-epochs).")]
BnStats = Annotated[Optional[str], typer.Option(
    "--bn-stats", rich_help_panel=RECIPE_PANEL, show_default="train; frozen with --train blocks|head",
    help="train: BatchNorm updates its running statistics on your data; frozen: keeps the pretrained ones all run "
         "(measured 5-12 points better on two small offline sets at the default lr, but unstable at lr 2e-3 without "
         "warm-up; docs/results.md).")]
NewLrMult = Annotated[Optional[float], typer.Option(
    "--new-lr-mult", hidden=True, rich_help_panel=RECIPE_PANEL,
    help="retrofit 0.1's option: sets --head-lr-mult and --block-lr-mult together.")]
FreezeBackboneEpochs = Annotated[int, typer.Option(
    "--freeze-backbone-epochs", rich_help_panel=RECIPE_PANEL, help="First train only the inserted blocks and the head for N epochs (BatchNorm statistics frozen too).")]
AccumSteps = Annotated[int, typer.Option("--accum-steps", rich_help_panel=RECIPE_PANEL, help="Gradient accumulation: micro-batches per optimizer step.")]
ClipGrad = Annotated[Optional[float], typer.Option("--clip-grad", rich_help_panel=RECIPE_PANEL, help="Clip the global gradient L2 norm to this value.")]
Ema = Annotated[bool, typer.Option("--ema", rich_help_panel=RECIPE_PANEL, help="Keep timm's EMA of the weights; evaluate it and save ema.safetensors.")]
EmaDecay = Annotated[float, typer.Option("--ema-decay", rich_help_panel=RECIPE_PANEL, help="EMA decay (reached after timm's warmup).")]
Seed = Annotated[int, typer.Option("--seed", rich_help_panel=RECIPE_PANEL, help="Seed of initialisation, data order and augmentation.")]
Hflip = Annotated[float, typer.Option("--hflip", rich_help_panel=DATA_PANEL, help="Horizontal-flip probability of the training augmentation.")]
Scale = Annotated[str, typer.Option("--scale", rich_help_panel=DATA_PANEL, help="MIN,MAX area fraction of the random-resized crop.")]
ColorJitter = Annotated[float, typer.Option("--color-jitter", rich_help_panel=DATA_PANEL, help="Colour-jitter strength (0 = off).")]
SkipBadImages = Annotated[bool, typer.Option("--skip-bad-images", rich_help_panel=DATA_PANEL, help="Skip unreadable images (counted) instead of stopping.")]
Workers = Annotated[Optional[int], typer.Option("--workers", "-j", rich_help_panel=DATA_PANEL, help="Data-loading processes per rank (default: min(4, CPUs)).")]
Download = Annotated[bool, typer.Option("--download", rich_help_panel=DATA_PANEL, help="Download a torchvision:NAME dataset when missing.")]
DatasetRoot = Annotated[Optional[Path], typer.Option(
    "--dataset-root", rich_help_panel=DATA_PANEL, help="Folder of torchvision datasets (default ~/.cache/retrofit/datasets).")]
Device = Annotated[str, typer.Option("--device", rich_help_panel=DEVICE_PANEL, help="auto (CUDA when present), cuda or cpu.")]
Precision = Annotated[str, typer.Option("--precision", rich_help_panel=DEVICE_PANEL, help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.")]
ChannelsLast = Annotated[Optional[bool], typer.Option(
    "--channels-last/--no-channels-last", rich_help_panel=DEVICE_PANEL, help="Memory format (default: channels_last on CUDA).")]
Compile = Annotated[bool, typer.Option("--compile", rich_help_panel=DEVICE_PANEL, help="Wrap the model in torch.compile.")]

# issue 20: what trains
Train = Annotated[str, typer.Option(
    "--train", rich_help_panel=RECIPE_PANEL, help="full (every weight); blocks (the inserted blocks and the head, backbone "
    "and BatchNorm statistics frozen); head (the head alone). blocks and head also write best.adapter.safetensors.")]


# issue 20: timm's augmentations (timm.data.create_transform, timm.data.Mixup), all off unless asked
AUGMENT_PANEL = "Augmentation (timm's; off unless asked)"
AutoAugment = Annotated[Optional[str], typer.Option(
    "--auto-augment", rich_help_panel=AUGMENT_PANEL, help="timm RandAugment / AutoAugment / AugMix string, e.g. "
    "rand-m9-mstd0.5-inc1, original, augmix-m5-w4-d2 (replaces --color-jitter).")]
ReProb = Annotated[float, typer.Option("--re-prob", rich_help_panel=AUGMENT_PANEL, help="Random-erasing probability per image (0 = off).")]
ReMode = Annotated[str, typer.Option("--re-mode", rich_help_panel=AUGMENT_PANEL, help="Random-erasing fill: pixel (per-pixel noise), rand (per-channel), const (zeros).")]
ReCount = Annotated[int, typer.Option("--re-count", rich_help_panel=AUGMENT_PANEL, help="Random-erasing boxes per image (at most).")]
Mixup = Annotated[float, typer.Option("--mixup", rich_help_panel=AUGMENT_PANEL, help="Mixup alpha (0 = off); with --mixup/--cutmix the loss is soft-target cross-entropy.")]
Cutmix = Annotated[float, typer.Option("--cutmix", rich_help_panel=AUGMENT_PANEL, help="CutMix alpha (0 = off).")]
MixupProb = Annotated[float, typer.Option("--mixup-prob", rich_help_panel=AUGMENT_PANEL, help="Probability that a batch is mixed.")]
MixupSwitchProb = Annotated[float, typer.Option("--mixup-switch-prob", rich_help_panel=AUGMENT_PANEL, help="With both on: probability of CutMix instead of Mixup.")]
MixupMode = Annotated[str, typer.Option("--mixup-mode", rich_help_panel=AUGMENT_PANEL, help="batch (one draw per batch), pair or elem.")]


def parse_floats(text: str, what: str, count: int) -> list[float]:
    """``"0.5,1"`` → ``[0.5, 1.0]``; a one-line error unless exactly ``count`` numbers."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        fail(f"{what} takes {count} numbers separated by commas, got {text!r}")
    if len(values) != count:
        fail(f"{what} takes {count} numbers separated by commas, got {text!r}")
    return values


def lr_mults(head_lr_mult: Optional[float], block_lr_mult: Optional[float], new_lr_mult: Optional[float], *,
             blocks: bool = True) -> dict[str, Any]:
    """``head_lr_mult`` (default 10) and ``block_lr_mult`` (None = the measured default) from the options;
    retrofit 0.1's ``--new-lr-mult M`` sets both (only the head's where ``blocks`` is False: a model name
    without ``--block`` has no inserted blocks), and is refused beside either of them."""
    if new_lr_mult is not None:
        if not (math.isfinite(new_lr_mult) and new_lr_mult > 0):
            fail(f"--new-lr-mult must be a finite number > 0, got {new_lr_mult}")
        if head_lr_mult is not None or block_lr_mult is not None:
            fail("--new-lr-mult sets both --head-lr-mult and --block-lr-mult; give those two instead")
        return {"head_lr_mult": new_lr_mult, "block_lr_mult": new_lr_mult if blocks else None}
    return {"head_lr_mult": 10.0 if head_lr_mult is None else head_lr_mult, "block_lr_mult": block_lr_mult}


def recipe_settings(
    *, val_data: Optional[Path], weights: Optional[Path], no_pretrained: bool, dataset_root: Optional[Path],
    scale: str, workers: Optional[int], head_lr_mult: Optional[float] = None, block_lr_mult: Optional[float] = None,
    new_lr_mult: Optional[float] = None, blocks: bool = True, **values: Any,
) -> dict[str, Any]:
    """:class:`~retrofit.train.FinetuneConfig` keyword arguments from the shared options' values.

    ``values`` holds the options whose value passes through unchanged (``epochs``, ``lr``, …,
    named as the config's fields). ``blocks``: whether the model may have inserted blocks (:func:`lr_mults`).
    """
    from ..train.config import default_workers

    return {
        **values,
        **lr_mults(head_lr_mult, block_lr_mult, new_lr_mult, blocks=blocks),
        "val_data": str(val_data) if val_data else None,
        "weights": str(weights) if weights else None,
        "pretrained": not no_pretrained,
        "dataset_root": str(dataset_root) if dataset_root else None,
        "scale": parse_floats(scale, "--scale", 2),
        "workers": default_workers() if workers is None else workers,
    }
