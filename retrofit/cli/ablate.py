"""``retrofit ablate SOURCE --data DIR -o OUTPUT``: a grid of finetune runs and the papers' tables from it.

Parsing and printing only; the library is :mod:`retrofit.ablation`. Every finetune option of
the data, recipe and device panels applies to every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, fail, handle_errors
from .finetune import SourceArg
from .finetune_options import (
    OUTPUT_PANEL, AccumSteps, BatchSize, BlockLrMult, BlockWarmupEpochs, BnStats, ChannelsLast, ClipGrad, ColorJitter,
    Compile, Data, DatasetRoot, Device, Download, Ema, EmaDecay, Epochs, Exclude, FreezeBackboneEpochs, Groups,
    HeadLrMult, Hflip, ImgSize, Include, Init, LabelSmoothing, Lr, MinLr, Momentum, NewLrMult, NoPretrained, Optimizer,
    Precision, Scale, SkipBadImages, ValData, WarmupEpochs, WeightDecay, Weights, Workers, recipe_settings,
)
from .finetune_options import (
    AutoAugment, Cutmix, Mixup, MixupMode, MixupProb, MixupSwitchProb, ReCount, ReMode, ReProb,
)

GRID_PANEL = "Grid (comma lists; the grid is their product)"


def _axis(flag: str, text: str) -> object:
    return Annotated[Optional[str], typer.Option(flag, rich_help_panel=GRID_PANEL, help=text)]


Blocks = _axis("--blocks", "none (the base model under the same recipe), noise (the base again, lr × (1 + 1e-5): the "
                           "recipe's run-to-run noise), eca, se, se-var1, se-var2, se-var3, se-gc. "
                           "Default: none,eca,se.")
Placements = _axis("--placements", "standard, pre, post, identity. Default: standard.")
StagesAxis = _axis("--stages", "Stage sets separated by ';', each 'all' or stage numbers: all;3,4;4. Default: all.")
Reductions = _axis("--reductions", "SE reduction ratios: 8,16,32. Default: 16.")
KernelSizes = _axis("--kernel-sizes", "ECA kernel sizes: adaptive,3,5. Default: adaptive.")
TrainModes = _axis("--train", "full; blocks (only the inserted blocks and the head, backbone and BatchNorm statistics "
                              "frozen); head (linear probe). Default: full.")
Seeds = _axis("--seeds", "Seeds, each cell trained once per seed (paired across cells). Default: 0,1,2.")


@app.command("ablate")
@handle_errors
def ablate(
    source: SourceArg,
    data: Data,
    output: Annotated[Path, typer.Option("--output", "-o", rich_help_panel=OUTPUT_PANEL, help="Folder of the grid: OUTPUT/<cell>/seed-<s>/ and the tables.")],
    blocks: Blocks = None,
    placements: Placements = None,
    stages: StagesAxis = None,
    reductions: Reductions = None,
    kernel_sizes: KernelSizes = None,
    train: TrainModes = None,
    seeds: Seeds = None,
    shard: Annotated[str, typer.Option("--shard", rich_help_panel=OUTPUT_PANEL, help="I/N: run only every N-th run from the I-th (a job array's task I of N).")] = "1/1",
    report_only: Annotated[bool, typer.Option("--report-only", rich_help_panel=OUTPUT_PANEL, help="Train nothing; merge the run folders into the tables.")] = False,
    val_data: ValData = None,
    init: Init = "identity",
    groups: Groups = None,
    include: Include = None,
    exclude: Exclude = None,
    weights: Weights = None,
    no_pretrained: NoPretrained = False,
    epochs: Epochs = 10,
    batch_size: BatchSize = 64,
    img_size: ImgSize = None,
    lr: Lr = 1e-3,
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
    """Fine-tune every cell of a grid once per seed under one recipe; write ablation.csv/.json/.md/.png.

    Re-running the same command skips finished runs and resumes an interrupted one; exit code 1 when a run failed.
    """
    from ..ablation import Grid
    from ..ablation import ablate as run
    from ..ablation.grid import parse_shard
    from ..train.config import FinetuneConfig

    grid = Grid.parse(init=init, blocks=blocks, placements=placements, stages=stages, reductions=reductions,
                      kernel_sizes=kernel_sizes, train=train, seeds=seeds)
    template = FinetuneConfig(
        source=source, data=data, output=str(output),
        **recipe_settings(
            val_data=val_data, weights=weights, no_pretrained=no_pretrained, dataset_root=dataset_root, scale=scale,
            workers=workers, init=init, groups=groups, include=list(include) if include else None,
            exclude=list(exclude) if exclude else None, download=download, img_size=img_size, hflip=hflip,
            color_jitter=color_jitter, skip_bad_images=skip_bad_images, epochs=epochs, batch_size=batch_size,
            optimizer=optimizer, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay,
            momentum=momentum, label_smoothing=label_smoothing, new_lr_mult=new_lr_mult,
            head_lr_mult=head_lr_mult, block_lr_mult=block_lr_mult, block_warmup_epochs=block_warmup_epochs,
            bn_stats=bn_stats or "train",
            freeze_backbone_epochs=freeze_backbone_epochs, accum_steps=accum_steps, clip_grad=clip_grad, ema=ema,
            ema_decay=ema_decay, device=device, precision=precision, channels_last=channels_last, compile=compile,
            auto_augment=auto_augment, re_prob=re_prob, re_mode=re_mode, re_count=re_count, mixup=mixup,
            cutmix=cutmix, mixup_prob=mixup_prob, mixup_switch_prob=mixup_switch_prob, mixup_mode=mixup_mode,
        ),
    )
    from ..train.augment import check_auto_augment

    check_auto_augment(auto_augment)  # once, before any run, not as a failure of every run
    from rich.console import Console

    console = Console()
    result = run(template, grid, shard=parse_shard(shard), report_only=report_only, console=console)
    done, failed, pending = (result.count(s) for s in ("done", "failed", "pending"))
    console.print(f"{len(result.runs)} runs: {done} done, {failed} failed, {pending} pending → "
                  f"{result.output / 'ablation.md'}", markup=False, highlight=False, soft_wrap=True)
    if failed:
        fail(f"{failed} of {len(result.runs)} runs failed; each is a row of {result.output / 'ablation.csv'} "
             "with its reason (status failed)", code=1)
