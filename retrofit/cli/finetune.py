"""``retrofit finetune SOURCE --data DIR``: fine-tune a checkpoint, or a model name plus a block to insert.

Parsing and printing only; the engine is :func:`retrofit.train.finetune`. Under
``torchrun --nproc-per-node N --no-python retrofit finetune …`` it runs as N DDP processes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from .add import (
    JsonOpt, KernelOpt, PlacementOpt, ReductionOpt, ReplaceOpt, StagesOpt, check_block_options,
)
from .app import app, fail, handle_errors, parse_ints
from .finetune_options import (
    INSERTION_PANEL, OUTPUT_PANEL, AccumSteps, BatchSize, BlockLrMult, BlockWarmupEpochs, BnStats, ChannelsLast,
    ClipGrad, ColorJitter, Compile, Data, DatasetRoot, Device, Download, Ema, EmaDecay, Epochs, Exclude,
    FreezeBackboneEpochs, Groups, HeadLrMult, Hflip, ImgSize, Include, Init, LabelSmoothing, Lr, MinLr, Momentum,
    NewLrMult, NoPretrained, Optimizer, Precision, Scale, Seed, SkipBadImages, ValData, WarmupEpochs, WeightDecay,
    Weights, Workers, in_panel, recipe_settings,
)
from .finetune_options import (
    AutoAugment, Cutmix, Mixup, MixupMode, MixupProb, MixupSwitchProb, ReCount, ReMode, ReProb, Train,
)

# the insertion options shared with `add` that ablate turns into axes, shown in this command's insertion panel
Placement, Reduction, Kernel, Stages, Replace = (
    in_panel(option, INSERTION_PANEL) for option in (PlacementOpt, ReductionOpt, KernelOpt, StagesOpt, ReplaceOpt)
)
Json = in_panel(JsonOpt, OUTPUT_PANEL)

SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", help="A retrofit checkpoint (.safetensors) or a model name: timm (tf_efficientnet_lite0), torchvision:NAME, hf-hub:ORG/NAME.")]


def default_output(source: str, block: str | None) -> Path:
    """``finetune-<source>[-<block>]`` with path separators and ``:`` made file-safe."""
    stem = Path(source).stem if source.endswith(".safetensors") else source
    return Path(f"finetune-{re.sub(r'[:/]+', '-', stem)}" + (f"-{block}" if block else ""))


HELP = (
    "Fine-tune SOURCE on an image dataset; write last/best checkpoints, metrics.csv, gates.csv, drift.csv and "
    "curves.png.\n\n"
    "The recipe for a retrofitted model: AdamW at --lr with a warm-up and a cosine schedule; the backbone at 1 × lr, "
    "a new head at --head-lr-mult (10) × lr, the inserted SE/ECA blocks in their own parameter group at "
    "--block-lr-mult (1) × lr with no weight decay; BatchNorm statistics updated (--bn-stats train). "
    "A base run and "
    "its retrofit with the same --seed draw the same random numbers, so they compare pairwise.\n\n"
    "When to change it: gates that saturate (gates.csv: min near 0 or max near 2) want a lower --block-lr-mult or "
    "--block-warmup-epochs (a new head settles first); a small dataset at a moderate lr (with warm-up), try "
    "--bn-stats frozen. Whether a "
    "difference is real: retrofit ablate --blocks none,noise,eca (docs/results.md)."
)


@app.command("finetune", help=HELP)
@handle_errors
def finetune(
    source: SourceArg,
    data: Data,
    val_data: ValData = None,
    epochs: Epochs = 10,
    batch_size: BatchSize = 64,
    img_size: ImgSize = None,
    lr: Lr = 1e-3,
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
    optimizer: Optimizer = "adamw",
    min_lr: MinLr = 1e-6,
    warmup_epochs: WarmupEpochs = 1.0,
    weight_decay: WeightDecay = 0.05,
    momentum: Momentum = 0.9,
    label_smoothing: LabelSmoothing = 0.1,
    head_lr_mult: HeadLrMult = None,
    block_lr_mult: BlockLrMult = None,
    block_warmup_epochs: BlockWarmupEpochs = None,
    bn_stats: BnStats = None,
    new_lr_mult: NewLrMult = None,
    freeze_backbone_epochs: FreezeBackboneEpochs = 0,
    accum_steps: AccumSteps = 1,
    clip_grad: ClipGrad = None,
    ema: Ema = False,
    ema_decay: EmaDecay = 0.9998,
    seed: Seed = 0,
    hflip: Hflip = 0.5,
    scale: Scale = "0.08,1.0",
    color_jitter: ColorJitter = 0.4,
    skip_bad_images: SkipBadImages = False,
    workers: Workers = None,
    download: Download = False,
    dataset_root: DatasetRoot = None,
    device: Device = "auto",
    precision: Precision = "auto",
    channels_last: ChannelsLast = None,
    compile: Compile = False,
    until_epoch: Annotated[Optional[int], typer.Option(
        "--until-epoch", rich_help_panel=OUTPUT_PANEL, help="Stop after this epoch (the schedule still spans --epochs); continue later with --resume.")] = None,
    as_json: Json = False,
    train: Train = "full",
    auto_augment: AutoAugment = None,
    re_prob: ReProb = 0.0,
    re_mode: ReMode = "pixel",
    re_count: ReCount = 1,
    mixup: Mixup = 0.0,
    cutmix: Cutmix = 0.0,
    mixup_prob: MixupProb = 1.0,
    mixup_switch_prob: MixupSwitchProb = 0.5,
    mixup_mode: MixupMode = "batch",
) -> None:
    """Fine-tune SOURCE on an image dataset (the help text is :data:`HELP`)."""
    insertion = {"--placement": placement != "standard", "--init": init != "identity", "--reduction": reduction != 16,
                 "--kernel-size": kernel_size is not None, "--groups": groups is not None, "--include": bool(include),
                 "--exclude": bool(exclude), "--stages": stages is not None, "--replace-existing": replace_existing}
    if block is None and any(insertion.values()):
        fail(f"{next(k for k, v in insertion.items() if v)} applies only with --block")
    if block is not None:
        check_block_options(block, reduction=reduction if reduction != 16 else None, kernel_size=kernel_size,
                            groups=groups)
    kernels = parse_ints(kernel_size, "--kernel-size")
    if bn_stats == "train" and train != "full":
        fail(f"--bn-stats train does not apply with --train {train}: the backbone and its BatchNorm statistics stay "
             "frozen")
    from ..train.config import FinetuneConfig

    config = FinetuneConfig(
        source=source, data=data, output=str(output or default_output(source, block)), block=block,
        placement=placement, reduction=reduction,
        kernel_size=kernels[0] if kernels and len(kernels) == 1 else kernels,
        stages=parse_ints(stages, "--stages"), replace_existing=replace_existing, until_epoch=until_epoch,
        resume=resume, overwrite=overwrite, train=train,
        **recipe_settings(
            val_data=val_data, weights=weights, no_pretrained=no_pretrained, dataset_root=dataset_root, scale=scale,
            workers=workers, init=init, groups=groups, include=list(include) if include else None,
            exclude=list(exclude) if exclude else None, download=download, img_size=img_size, hflip=hflip,
            color_jitter=color_jitter, skip_bad_images=skip_bad_images, epochs=epochs, batch_size=batch_size,
            optimizer=optimizer, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
            momentum=momentum, label_smoothing=label_smoothing, new_lr_mult=new_lr_mult,
            blocks=block is not None or source.endswith(".safetensors"),
            head_lr_mult=head_lr_mult, block_lr_mult=block_lr_mult, block_warmup_epochs=block_warmup_epochs,
            bn_stats=bn_stats or ("train" if train == "full" else "frozen"),
            freeze_backbone_epochs=freeze_backbone_epochs, accum_steps=accum_steps, clip_grad=clip_grad, ema=ema,
            ema_decay=ema_decay, seed=seed, device=device, precision=precision, channels_last=channels_last,
            compile=compile,
            auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count, mixup=mixup,
            cutmix=cutmix, mixup_prob=mixup_prob, mixup_switch_prob=mixup_switch_prob, mixup_mode=mixup_mode,
        ),
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
