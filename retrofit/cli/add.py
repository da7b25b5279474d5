"""``retrofit add BLOCK MODEL``, its short forms ``add-se`` / ``add-eca``, and ``retrofit sites MODEL``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .app import app, fail, handle_errors, parse_input_size, parse_ints

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="timm name (resnet50, resnet50.a1_in1k), torchvision:NAME or hf-hub:ORG/NAME.")]
WeightsOpt = Annotated[
    Optional[Path],
    typer.Option("--weights", help="Local weights: .safetensors, or .pth/.pt/.bin (read with weights_only=True); "
                 "for an adapter checkpoint, the base weights it applies to."),
]
NoPretrainedOpt = Annotated[bool, typer.Option("--no-pretrained", help="Random init: architecture-only work.")]
PlacementOpt = Annotated[
    str, typer.Option("--placement", help="standard (residual branch, before the addition), pre, post or identity (shortcut).")
]
InitOpt = Annotated[
    str, typer.Option("--init", help="identity: gate = 2·sigmoid, last layer zeroed, outputs unchanged; paper: the papers' form.")
]
ReductionOpt = Annotated[
    Optional[int], typer.Option("--reduction", "-r", help="SE reduction ratio r (hidden width about C/r); default 16.")
]
KernelOpt = Annotated[
    Optional[str],
    typer.Option("--kernel-size", "-k", help="ECA kernel size: odd K, or one per stage (3,5,5,7). Default: adaptive rule."),
]
RdDivisorOpt = Annotated[
    Optional[int],
    typer.Option("--rd-divisor", help="SE hidden width: C/r rounded to a multiple of this, at least it (timm; "
                 "default 8); 1 = the paper's C // r."),
]
GroupsOpt = Annotated[
    Optional[int], typer.Option("--groups", help="se-gc group count (default 16); per site the largest divisor of C not above it.")
]
NumClassesOpt = Annotated[
    Optional[int],
    typer.Option("--num-classes", help="Classifier size to build (default: the model's, or the one in --weights)."),
]
IncludeOpt = Annotated[
    Optional[list[str]], typer.Option("--include", help="Only sites whose owner matches (glob, or re:REGEX). Repeatable.")
]
ExcludeOpt = Annotated[
    Optional[list[str]], typer.Option("--exclude", help="Skip sites whose owner matches (glob, or re:REGEX). Repeatable.")
]
StagesOpt = Annotated[Optional[str], typer.Option("--stages", help="Only these stages, e.g. 3,4: timm's feature_info index, else stride 4 → 1 … 32 → 4 (ResNet layer1…layer4 → 1…4).")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Checkpoint path. Default: <model>-<block>.safetensors.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ReplaceOpt = Annotated[
    bool, typer.Option("--replace-existing", help="Swap the model's existing SE modules for this block instead of adding new ones.")
]
InputSizeOpt = Annotated[Optional[str], typer.Option("--input-size", help="C,H,W of the probe input (default: the model's).")]


def default_output(model: str, block: str) -> Path:
    """``<model>-<block>.safetensors`` with ``:`` and ``/`` made file-safe."""
    return Path(f"{re.sub(r'[:/]+', '-', model)}-{block}.safetensors")


def run_add(
    block: str,
    model: str,
    *,
    weights: Optional[Path],
    no_pretrained: bool,
    placement: str,
    init: str,
    reduction: Optional[int] = None,
    rd_divisor: Optional[int] = None,
    kernel_size: Optional[str] = None,
    groups: Optional[int] = None,
    num_classes: Optional[int] = None,
    include: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    stages: Optional[str] = None,
    output: Optional[Path],
    overwrite: bool,
    as_json: bool,
    input_size: Optional[str] = None,
    replace_existing: bool = False,
) -> None:
    from ..limits import check_block_numbers

    check_block_options(block, reduction=reduction, kernel_size=kernel_size, groups=groups, rd_divisor=rd_divisor)
    kernels = parse_ints(kernel_size, "--kernel-size")
    stage_list = parse_ints(stages, "--stages")
    check_block_numbers(reduction=reduction, kernel_size=kernels, groups=groups, stages=stage_list,
                        rd_divisor=rd_divisor, num_classes=num_classes)
    size = parse_input_size(input_size)  # every number is checked before torch is imported

    from ..blocks import block_class
    from ..checkpoint import check_writable
    from ..surgery import check_placement_and_init

    block_class(block)  # an unknown block, placement or init fails before the output is looked at
    check_placement_and_init(placement, init)
    check_weight_flags(model, weights, no_pretrained, name="MODEL")
    if weights is not None:
        from ..weights import check_weights_path

        check_weights_path(weights)
    # the inputs are all named above; now the output (an existing one is never replaced silently)
    output = check_writable(output if output is not None else default_output(model, block), overwrite)
    if output.suffix != ".safetensors":
        fail(f"output {output} must be a file name ending in .safetensors")
    if weights is not None and output.exists() and output.resolve() == weights.resolve():
        fail(f"output {output} is the --weights file itself; write the checkpoint to another file")

    from ..checkpoint import save_checkpoint
    from ..lock import output_lock
    from ..models import load_model
    from ..surgery import add_attention

    with output_lock(output, "-o"):  # one writer per checkpoint path, for the whole command
        check_writable(output, overwrite)  # again, now that no other command can be writing it
        net, _, origin = load_model(model, pretrained=not no_pretrained, weights=weights, **model_kwargs(num_classes))
        before = sum(p.numel() for p in net.parameters())
        net, sites = add_attention(
            net,
            block,
            placement=placement,
            reduction=16 if reduction is None else reduction,
            rd_divisor=8 if rd_divisor is None else rd_divisor,
            kernel_size=kernels if kernels is None or len(kernels) > 1 else kernels[0],
            groups=groups,
            init=init,
            include=include,
            exclude=exclude,
            stages=stage_list,
            replace_existing=replace_existing,
            input_size=size,
        )
        after = sum(p.numel() for p in net.parameters())
        save_checkpoint(net, output, overwrite=overwrite)
    report = {
        "model": model,
        "weights": origin,
        "block": block,
        "placement": placement,
        "init": init,
        "sites": [] if replace_existing else [_site_row(s) for s in sites],
        "replaced": [_replaced_row(r, block) for r in sites] if replace_existing else [],
        "params_before": before,
        "params_after": after,
        "output": str(output),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_add(report)


def check_weight_flags(target: str, weights: Optional[Path], no_pretrained: bool, flag: str = "--weights",
                       name: str = "TARGET") -> None:
    """One-line errors for weight options that cannot apply to ``target`` (a full checkpoint holds its own;
    an adapter's ``--weights`` is its base)."""
    from ..adapter import is_adapter
    from ..checkpoint import is_checkpoint

    if weights is not None and no_pretrained:
        fail(f"{flag} and --no-pretrained exclude each other")
    if is_checkpoint(target) and weights is not None and not is_adapter(target):
        fail(f"{flag} applies to {name} when it is a model name or an adapter (its base); {target} is a full checkpoint")
    if is_checkpoint(target) and no_pretrained:
        fail(f"--no-pretrained applies to a model name; {target} is a checkpoint, which holds its own weights")


def check_block_options(block: str, *, reduction: Any, kernel_size: Any, groups: Any, rd_divisor: Any = None) -> None:
    """One-line error for a block option given (not None) to a block it does not apply to."""
    for given, option, applies in ((reduction, "--reduction", "se"), (kernel_size, "--kernel-size", "eca"),
                                   (groups, "--groups", "se-gc"), (rd_divisor, "--rd-divisor", "se")):
        if given is not None and block != applies:
            fail(f"{option} applies to {applies}, not to {block}")


def model_kwargs(num_classes: Optional[int]) -> dict[str, Any]:
    """Constructor kwargs from the model-building options (``num_classes`` when given)."""
    return {} if num_classes is None else {"num_classes": num_classes}


def _site_row(s: Any) -> dict[str, Any]:
    from ..blocks import block_class

    return {
        "owner": s.owner,
        "key": s.key,
        "channels": s.channels,
        "height": s.height,
        "width": s.width,
        "stage": s.site.stage,
        "shortcut": "projection" if s.site.projection else "identity",
        "block": s.block,
        "options": s.options,
        "setting": block_class(s.block).describe(s.options),
        "params": s.params,
    }


def _percent(delta: int, base: int) -> str:
    """``+9.90%``, ``+0.00071%``: three significant digits, so a small change never reads as zero."""
    return f"{100 * delta / base:+.3g}%" if base else "n/a"


def _replaced_row(r: Any, block: str) -> dict[str, Any]:
    from ..blocks import block_class

    row = r.to_dict()
    row["setting"] = block_class(block).describe(r.options)
    return row


def _print_add(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    if report["replaced"]:
        _print_replaced(report)
        return

    table = Table(title=f"{report['block']} at {len(report['sites'])} sites of {report['model']} ({report['placement']})")
    for col, just in (("owner", "left"), ("C", "right"), ("H×W", "right"), ("stage", "right"), ("block", "left"),
                      ("k / r", "left"), ("params added", "right")):
        table.add_column(col, justify=just)
    for r in report["sites"]:
        table.add_row(r["owner"], str(r["channels"]), f"{r['height']}×{r['width']}", str(r["stage"]), r["block"],
                      r["setting"], f"{r['params']:,}")
    console = Console()
    console.print(table)
    b, a = report["params_before"], report["params_after"]
    console.print(f"parameters {b:,} → {a:,} ({a - b:+,}, {_percent(a - b, b)}) · init: {report['init']}")
    console.print(f"weights: {report['weights']}", markup=False)
    console.print(f"wrote {report['output']}")


def _print_replaced(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = report["replaced"]
    table = Table(title=f"replaced {len(rows)} SE modules of {report['model']} with {report['block']}")
    for col, just in (("module", "left"), ("was", "left"), ("C", "right"), ("now", "left"), ("params", "right")):
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r["path"], r["was"], str(r["channels"]), f"{report['block']} {r['setting']}",
                      f"{r['params_before']:,} → {r['params_after']:,}")
    console = Console()
    console.print(table)
    b, a = report["params_before"], report["params_after"]
    console.print(f"replaced {len(rows)} modules · parameters {b:,} → {a:,} ({a - b:+,}, {_percent(a - b, b)})")
    console.print(f"wrote {report['output']}")


@app.command("add")
@handle_errors
def add(
    block: Annotated[str, typer.Argument(metavar="BLOCK", help="se, eca, se-var1, se-var2, se-var3 or se-gc.")],
    model: ModelArg,
    weights: WeightsOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    placement: PlacementOpt = "standard",
    init: InitOpt = "identity",
    reduction: ReductionOpt = None,
    rd_divisor: RdDivisorOpt = None,
    kernel_size: KernelOpt = None,
    groups: GroupsOpt = None,
    num_classes: NumClassesOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    stages: StagesOpt = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    input_size: InputSizeOpt = None,
    replace_existing: ReplaceOpt = False,
) -> None:
    """Insert a channel-attention BLOCK at the residual sites of MODEL and save a checkpoint."""
    run_add(block, model, weights=weights, no_pretrained=no_pretrained, placement=placement, init=init,
            reduction=reduction, rd_divisor=rd_divisor, kernel_size=kernel_size, groups=groups,
            num_classes=num_classes, include=include, exclude=exclude,
            stages=stages, output=output, overwrite=overwrite, as_json=as_json, input_size=input_size,
            replace_existing=replace_existing)


@app.command("add-se")
@handle_errors
def add_se(
    model: ModelArg,
    reduction: ReductionOpt = None,
    rd_divisor: RdDivisorOpt = None,
    num_classes: NumClassesOpt = None,
    weights: WeightsOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    placement: PlacementOpt = "standard",
    init: InitOpt = "identity",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    stages: StagesOpt = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    input_size: InputSizeOpt = None,
    replace_existing: ReplaceOpt = False,
) -> None:
    """Insert Squeeze-and-Excitation (Hu et al., arXiv 1709.01507) at the residual sites of MODEL."""
    run_add("se", model, weights=weights, no_pretrained=no_pretrained, placement=placement, init=init,
            reduction=reduction, rd_divisor=rd_divisor, num_classes=num_classes, include=include, exclude=exclude,
            stages=stages, output=output,
            overwrite=overwrite, as_json=as_json, input_size=input_size, replace_existing=replace_existing)


@app.command("add-eca")
@handle_errors
def add_eca(
    model: ModelArg,
    kernel_size: KernelOpt = None,
    num_classes: NumClassesOpt = None,
    weights: WeightsOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    placement: PlacementOpt = "standard",
    init: InitOpt = "identity",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    stages: StagesOpt = None,
    output: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    input_size: InputSizeOpt = None,
    replace_existing: ReplaceOpt = False,
) -> None:
    """Insert Efficient Channel Attention (Wang et al., arXiv 1910.03151) at the residual sites of MODEL."""
    run_add("eca", model, weights=weights, no_pretrained=no_pretrained, placement=placement, init=init,
            kernel_size=kernel_size, num_classes=num_classes, include=include, exclude=exclude, stages=stages,
            output=output,
            overwrite=overwrite, as_json=as_json, input_size=input_size, replace_existing=replace_existing)


@app.command("sites")
@handle_errors
def sites(
    model: ModelArg,
    as_json: JsonOpt = False,
    input_size: InputSizeOpt = None,
    num_classes: NumClassesOpt = None,
) -> None:
    """List the residual sites of MODEL (owner, C, H×W, stage) without changing anything."""
    size = parse_input_size(input_size)
    from ..limits import check_block_numbers

    check_block_numbers(num_classes=num_classes)
    from ..errors import RetrofitError
    from ..graph import default_input_size, find_sites
    from ..stages import stages_measurable
    from ..models import load_model

    net, _, _ = load_model(model, pretrained=False, **model_kwargs(num_classes))
    size = size or default_input_size(net)
    found, failures = find_sites(net, size)
    if not found:
        from ..surgery import no_site_message

        raise RetrofitError(no_site_message(net, failures))
    rows = [
        {"owner": s.owner, "index": s.index, "channels": s.channels, "in_channels": s.in_channels,
         "height": s.height, "width": s.width, "stage": s.stage,
         "shortcut": "projection" if s.projection else "identity"}
        for s in found
    ]
    untraced = [{"owner": f.owner, "type": f.module_type, "reason": f.reason} for f in failures]
    if as_json:
        typer.echo(json.dumps({"model": model, "input_size": list(size), "stages_measurable": stages_measurable(found),
                               "sites": rows, "untraced": untraced}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} residual sites of {model}")
    for col in ("owner", "C", "C in", "H×W", "stage", "shortcut"):
        table.add_column(col, justify="left" if col in ("owner", "shortcut") else "right")
    for r in rows:
        table.add_row(r["owner"], str(r["channels"]), str(r["in_channels"]), f"{r['height']}×{r['width']}",
                      str(r["stage"]), r["shortcut"])
    console = Console()
    console.print(table)
    if not stages_measurable(found):
        console.print(f"[yellow]note[/yellow] at input size {'×'.join(map(str, size))} some maps shrink to "
                      "1 pixel: the stage numbers are not reliable (use a larger --input-size)")
    for f in untraced:  # honest about what could not be looked into
        console.print(f"[yellow]not traced[/yellow] {f['owner'] or '<root>'} ({f['type']}): {f['reason']}")
