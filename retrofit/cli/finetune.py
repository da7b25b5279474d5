"""``retrofit finetune SOURCE --data DIR``: fine-tune a checkpoint, or a model name plus a block to insert.

Parsing and printing only; the engine is :func:`retrofit.train.finetune`. Under
``torchrun --nproc-per-node N --no-python retrofit finetune …`` it runs as N DDP processes.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Optional, get_args

import typer

from .add import (
    ExcludeOpt, GroupsOpt, IncludeOpt, InitOpt, JsonOpt, KernelOpt, NoPretrainedOpt, PlacementOpt, ReductionOpt,
    ReplaceOpt, StagesOpt, WeightsOpt, check_block_options,
)
from .app import app, fail, handle_errors, parse_ints

DATA_PANEL, RECIPE_PANEL, DEVICE_PANEL, OUTPUT_PANEL = "Data", "Training recipe", "Device", "Output"
INSERTION_PANEL = "Model and insertion (with a model name)"


def _in_panel(option: Any, panel: str) -> Any:
    """A copy of a shared ``Annotated[type, typer.Option(...)]`` shown in help panel ``panel``."""
    base, info = get_args(option)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[base, info]


# the options shared with `add`, shown in this command's insertion panel
Placement, Init, Reduction, Kernel, Groups, Include, Exclude, Stages, Replace, Weights, NoPretrained = (
    _in_panel(option, INSERTION_PANEL) for option in (
        PlacementOpt, InitOpt, ReductionOpt, KernelOpt, GroupsOpt, IncludeOpt, ExcludeOpt, StagesOpt, ReplaceOpt,
        WeightsOpt, NoPretrainedOpt,
    )
)
Json = _in_panel(JsonOpt, OUTPUT_PANEL)

SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", help="A retrofit checkpoint (.safetensors) or a model name: timm (tf_efficientnet_lite0), torchvision:NAME, hf-hub:ORG/NAME.")]


def default_output(source: str, block: str | None) -> Path:
    """``finetune-<source>[-<block>]`` with path separators and ``:`` made file-safe."""
    stem = Path(source).stem if source.endswith(".safetensors") else source
    return Path(f"finetune-{re.sub(r'[:/]+', '-', stem)}" + (f"-{block}" if block else ""))


def _floats(text: str, what: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        fail(f"{what} takes {count} numbers separated by commas, got {text!r}")
    if len(values) != count:
        fail(f"{what} takes {count} numbers separated by commas, got {text!r}")
    return values


@app.command("finetune")
@handle_errors
def finetune(
    source: SourceArg,
    data: Annotated[str, typer.Option(
        "--data", rich_help_panel=DATA_PANEL, help="ImageFolder root with train/<class>/… and val/<class>/… (or the train root, with --val-data), "
                       "or torchvision:NAME, e.g. torchvision:CIFAR10.")],
    val_data: Annotated[Optional[Path], typer.Option("--val-data", rich_help_panel=DATA_PANEL, help="Validation ImageFolder root (then --data is the train root).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", rich_help_panel=RECIPE_PANEL, help="Epochs; the cosine schedule spans all of them.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", rich_help_panel=RECIPE_PANEL, help="Images per step and process.")] = 64,
    img_size: Annotated[Optional[int], typer.Option("--img-size", rich_help_panel=DATA_PANEL, help="Square input side in pixels (default: the model's).")] = None,
    lr: Annotated[float, typer.Option("--lr", rich_help_panel=RECIPE_PANEL, help="Peak learning rate of the backbone.")] = 1e-3,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", rich_help_panel=OUTPUT_PANEL, help="Run folder. Default: finetune-<source>[-<block>].")] = None,
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=OUTPUT_PANEL, help="Continue the run in --output from its last completed epoch.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", rich_help_panel=OUTPUT_PANEL, help="Start over in an --output that holds a previous run.")] = False,
    block: Annotated[Optional[str], typer.Option("--block", rich_help_panel=INSERTION_PANEL, help="Insert this block first: eca, se, se-var1, se-var2, se-var3, se-gc.")] = None,
    placement: Placement = "standard",
    init: Init = "identity",
    reduction: Reduction = 16,
    kernel_size: Kernel = None,
    groups: Groups = None,
    include: Include = None,
    exclude: Exclude = None,
    stages: Stages = None,
    replace_existing: Replace = False,
    weights: Weights = None,
    no_pretrained: NoPretrained = False,
    optimizer: Annotated[str, typer.Option("--optimizer", rich_help_panel=RECIPE_PANEL, help="adamw or sgd (Nesterov momentum).")] = "adamw",
    min_lr: Annotated[float, typer.Option("--min-lr", rich_help_panel=RECIPE_PANEL, help="Learning rate at the end of the cosine schedule.")] = 1e-6,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", rich_help_panel=RECIPE_PANEL, help="Linear warmup length in epochs (may be fractional).")] = 1.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", rich_help_panel=RECIPE_PANEL, help="Decoupled (AdamW) or L2 (SGD) decay; never on norms, biases, gates.")] = 0.05,
    momentum: Annotated[float, typer.Option("--momentum", rich_help_panel=RECIPE_PANEL, help="SGD momentum.")] = 0.9,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", rich_help_panel=RECIPE_PANEL, help="Label smoothing of the training loss.")] = 0.1,
    new_lr_mult: Annotated[float, typer.Option("--new-lr-mult", rich_help_panel=RECIPE_PANEL, help="Learning-rate factor of the inserted blocks and the head.")] = 10.0,
    freeze_backbone_epochs: Annotated[int, typer.Option(
        "--freeze-backbone-epochs", rich_help_panel=RECIPE_PANEL, help="First train only the inserted blocks and the head for N epochs (BatchNorm statistics frozen too).")] = 0,
    accum_steps: Annotated[int, typer.Option("--accum-steps", rich_help_panel=RECIPE_PANEL, help="Gradient accumulation: micro-batches per optimizer step.")] = 1,
    clip_grad: Annotated[Optional[float], typer.Option("--clip-grad", rich_help_panel=RECIPE_PANEL, help="Clip the global gradient L2 norm to this value.")] = None,
    ema: Annotated[bool, typer.Option("--ema", rich_help_panel=RECIPE_PANEL, help="Keep timm's EMA of the weights; evaluate it and save ema.safetensors.")] = False,
    ema_decay: Annotated[float, typer.Option("--ema-decay", rich_help_panel=RECIPE_PANEL, help="EMA decay (reached after timm's warmup).")] = 0.9998,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=RECIPE_PANEL, help="Seed of initialisation, data order and augmentation.")] = 0,
    hflip: Annotated[float, typer.Option("--hflip", rich_help_panel=DATA_PANEL, help="Horizontal-flip probability of the training augmentation.")] = 0.5,
    scale: Annotated[str, typer.Option("--scale", rich_help_panel=DATA_PANEL, help="MIN,MAX area fraction of the random-resized crop.")] = "0.08,1.0",
    color_jitter: Annotated[float, typer.Option("--color-jitter", rich_help_panel=DATA_PANEL, help="Colour-jitter strength (0 = off).")] = 0.4,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images", rich_help_panel=DATA_PANEL, help="Skip unreadable images (counted) instead of stopping.")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", rich_help_panel=DATA_PANEL, help="Data-loading processes per rank (default: min(4, CPUs)).")] = None,
    download: Annotated[bool, typer.Option("--download", rich_help_panel=DATA_PANEL, help="Download a torchvision:NAME dataset when missing.")] = False,
    dataset_root: Annotated[Optional[Path], typer.Option(
        "--dataset-root", rich_help_panel=DATA_PANEL, help="Folder of torchvision datasets (default ~/.cache/retrofit/datasets).")] = None,
    device: Annotated[str, typer.Option("--device", rich_help_panel=DEVICE_PANEL, help="auto (CUDA when present), cuda or cpu.")] = "auto",
    precision: Annotated[str, typer.Option("--precision", rich_help_panel=DEVICE_PANEL, help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32.")] = "auto",
    channels_last: Annotated[Optional[bool], typer.Option(
        "--channels-last/--no-channels-last", rich_help_panel=DEVICE_PANEL, help="Memory format (default: channels_last on CUDA).")] = None,
    compile: Annotated[bool, typer.Option("--compile", rich_help_panel=DEVICE_PANEL, help="Wrap the model in torch.compile.")] = False,
    until_epoch: Annotated[Optional[int], typer.Option(
        "--until-epoch", rich_help_panel=OUTPUT_PANEL, help="Stop after this epoch (the schedule still spans --epochs); continue later with --resume.")] = None,
    as_json: Json = False,
) -> None:
    """Fine-tune SOURCE on an image dataset; write last/best checkpoints, metrics.csv and curves.png."""
    insertion = {"--placement": placement != "standard", "--init": init != "identity", "--reduction": reduction != 16,
                 "--kernel-size": kernel_size is not None, "--groups": groups is not None, "--include": bool(include),
                 "--exclude": bool(exclude), "--stages": stages is not None, "--replace-existing": replace_existing}
    if block is None and any(insertion.values()):
        fail(f"{next(k for k, v in insertion.items() if v)} applies only with --block")
    if block is not None:
        check_block_options(block, reduction=reduction if reduction != 16 else None, kernel_size=kernel_size,
                            groups=groups)
    kernels = parse_ints(kernel_size, "--kernel-size")
    from ..train.config import FinetuneConfig, default_workers

    config = FinetuneConfig(
        source=source, data=data, output=str(output or default_output(source, block)),
        val_data=str(val_data) if val_data else None, block=block, placement=placement, init=init,
        reduction=reduction, kernel_size=kernels[0] if kernels and len(kernels) == 1 else kernels, groups=groups,
        include=list(include) if include else None, exclude=list(exclude) if exclude else None,
        stages=parse_ints(stages, "--stages"), replace_existing=replace_existing,
        weights=str(weights) if weights else None, pretrained=not no_pretrained,
        dataset_root=str(dataset_root) if dataset_root else None, download=download, img_size=img_size,
        hflip=hflip, scale=_floats(scale, "--scale", 2), color_jitter=color_jitter, skip_bad_images=skip_bad_images,
        workers=default_workers() if workers is None else workers, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
        momentum=momentum, label_smoothing=label_smoothing, new_lr_mult=new_lr_mult,
        freeze_backbone_epochs=freeze_backbone_epochs, accum_steps=accum_steps, clip_grad=clip_grad, ema=ema,
        ema_decay=ema_decay, seed=seed, device=device, precision=precision, channels_last=channels_last,
        compile=compile, until_epoch=until_epoch, resume=resume, overwrite=overwrite,
    )
    config.validate()  # every number, before torch is imported or anything is loaded
    if block is not None:
        from ..blocks import block_class

        block_class(block)  # an unknown block fails before any loading
    from rich.console import Console

    from ..train.run import finetune as run

    result = run(config, console=Console(stderr=as_json))
    if as_json and int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps({
            "output": str(result.output), "epochs_done": result.epochs_done, "best": result.best,
            "history": result.history, "seconds": result.seconds, "rank_weight_digests": result.rank_digests,
        }, indent=2))
