"""``retrofit report params-flops TARGET``: parameters, MACs, FLOPs and element ops, before and after."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Annotated, Any, Optional

import typer

from .add import NoPretrainedOpt, NumClassesOpt, WeightsOpt, check_weight_flags
from .app import app, fail, handle_errors, parse_input_size

report_app = typer.Typer(help="Reports on a model or a retrofit checkpoint.", no_args_is_help=True)
app.add_typer(report_app, name="report")

TargetArg = Annotated[
    str, typer.Argument(metavar="TARGET", help="timm name, torchvision:NAME, hf-hub:ORG/NAME, or a retrofit .safetensors checkpoint.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="N of the input; MACs and element ops scale with it.")]
_METRICS = (
    ("params", "params"),
    ("trainable_params", "trainable params"),
    ("macs", "MACs"),
    ("flops", "FLOPs (2 × MACs)"),
    ("fvcore_macs", "fvcore-style MACs (timm's GMACs)"),
    ("element_ops", "element ops"),
    ("latency_ms", "latency (ms)"),
)
_SITE_COLUMNS = ("key", "owner", "block", "setting", "channels", "height", "width", "params", "macs", "flops",
                 "element_ops", "replaced", "replaced_params")


@report_app.command(
    "params-flops",
    epilog=(
        "[bold]Counting rules[/bold]\n\n"
        "Params: unique tensors (a module shared by two parents counts once).\n\n"
        "MACs: multiply-accumulates of convolution (1-D, 2-D, grouped, depthwise, transposed), linear/matmul and "
        "attention (QKᵀ and A·V of every scaled-dot-product kernel), counted on the aten ops that actually run "
        "(F.conv2d inside Conv2dSame counts, so does a @ b; nn.MultiheadAttention's fused fast path is off while "
        "counting); bias additions excluded, as in published tables. FLOPs = 2 × MACs.\n\n"
        "fvcore-style MACs: MACs plus the norm and upsampling operations that fvcore also counts; timm publishes "
        "these totals as GMACs.\n\n"
        "Element ops, their own line: add, mul, sigmoid, relu, comparisons and the other pointwise ops 1 per "
        "output element; mean, sum and adaptive pooling 1 per input element; k×k max/avg pooling k·k per output "
        "element; bilinear upsampling 4 per output element; batch norm in eval 2 per element (1 without affine); "
        "layer/group norm 5 per element (4 without affine).\n\n"
        "Views, padding, copies and nearest resizing cost nothing; any other op without a rule (e.g. softmax) is "
        "listed as uncounted, in every output format (--csv: on stderr).\n\n"
        "Counts need no weights: a model name is built without downloading any (the architecture of its "
        "pretrained model; --no-pretrained: as the zoo builds it without weights, which for torchvision's "
        "GoogLeNet keeps the auxiliary classifiers).\n\n"
        "One forward pass in eval mode under no_grad on seeded noise; the model is not changed. "
        "--latency: median of 20 timed passes after 5 warm-up passes, naming the device and thread count, "
        "with the spread of the runs (p25–p75); a Δ inside that spread is reported as no measured difference.\n\n"
        "Details and the JSON keys: docs/profile.md."
    ),
)
@handle_errors
def params_flops(
    target: TargetArg,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="Input without batch: C,H,W (default: 3,224,224, or the size a fine-tuned checkpoint was trained at).")] = None,
    batch_size: BatchOpt = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (stable keys, see docs/profile.md).")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table for a README.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV with exact integers.")] = False,
    per_site: Annotated[bool, typer.Option("--per-site", help="One row per inserted block (checkpoints).")] = False,
    latency: Annotated[bool, typer.Option("--latency", help="Also time the forward pass (median of 20).")] = False,
    weights: WeightsOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    num_classes: NumClassesOpt = None,
) -> None:
    """Parameters, MACs, FLOPs and element ops of TARGET; for a checkpoint, base → retrofitted with Δ and %.

    No weights are downloaded: counts need the architecture, not its weights.
    """
    if sum((as_json, as_markdown, as_csv)) > 1:
        fail("choose one of --json, --markdown, --csv")
    check_weight_flags(target, weights, no_pretrained)
    from ..limits import check_block_numbers

    check_block_numbers(num_classes=num_classes)
    size = parse_input_size(input_size)  # three positive integers within retrofit.limits
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")

    from ..checkpoint import is_checkpoint

    if per_site and not is_checkpoint(target):
        fail(f"--per-site needs a retrofit checkpoint (.safetensors); {target} has no inserted blocks "
             f"(`retrofit sites {target}` lists its residual sites)")
    from ..profiling.report import profile_target

    report = profile_target(target, tuple(size) if size is not None else None, batch_size, pretrained=not no_pretrained,
                            weights=str(weights) if weights is not None else None, latency=latency,
                            num_classes=num_classes)
    data = report.to_dict()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    elif as_markdown:
        typer.echo(_markdown(data, per_site))
    elif as_csv:
        typer.echo(_csv(data, per_site), nl=False)
        note = _uncounted(data)
        if note:  # stdout stays plain CSV; the warning must not be lost
            typer.echo(f"warning: {note}", err=True)
    else:
        _print_rich(data, per_site)


def _si(value: float | int | None, signed: bool = False) -> str:
    """``4089184256`` → ``4.089 G`` (MACs, FLOPs, element ops: the field's units)."""
    if value is None:
        return "-"
    sign = ("+" if value > 0 else "") if signed else ""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{sign}{value / scale:.3f} {unit}"
    return f"{sign}{value:,}"


def _cell(key: str, value: float | int | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    if key == "latency_ms":
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    if key in ("params", "trainable_params"):
        return f"{value:+,}" if signed else f"{value:,}"
    return _si(value, signed)


def _percent(value: float | None) -> str:
    """``+9.90%``; a tiny non-zero change keeps two significant digits (``+0.00034%``), never ``+0.00%``."""
    if value is None:
        return "-"
    decimals = 2 if value == 0 or abs(value) >= 0.01 else 1 - math.floor(math.log10(abs(value)))
    return f"{value:+.{decimals}f}%"


def _value(profile: dict[str, Any], key: str) -> float | int | None:
    if key == "latency_ms":
        return profile["latency"]["median_ms"] if profile["latency"] else None
    return profile[key]


def _latency_setup(data: dict[str, Any]) -> str:
    lat = data["model"]["latency"]
    return (f"median of {lat['runs']} runs after {lat['warmup']} warm-up, {lat['device']}, "
            f"{lat['threads']} thread{'s' if lat['threads'] != 1 else ''}")


def _latency_spread(data: dict[str, Any]) -> str | None:
    """The run-to-run spread of the timings, and whether the Δ of medians is inside it."""
    model, base = data["model"]["latency"], (data["base"] or {}).get("latency")
    if not model:
        return None
    def quartiles(lat: dict[str, Any]) -> str:
        return f"{lat['p25_ms']:.2f}–{lat['p75_ms']:.2f} ms"
    if not base:
        return f"latency spread (p25–p75 of the runs): {quartiles(model)}"
    text = f"latency spread (p25–p75 of the runs): base {quartiles(base)}, retrofitted {quartiles(model)}"
    if data["latency_delta_measured"] is False:
        text += ("; the Δ is within it, so no difference was measured (time on an idle machine, "
                 "or with benchmarks/inference.py)")
    return text


def _metric_rows(data: dict[str, Any], latency_setup: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the totals table, formatted for people (latency setup in its label or not)."""
    model, base = data["model"], data["base"]
    keys = [k for k, _ in _METRICS if k != "latency_ms" or model["latency"]]
    labels = dict(_METRICS)
    if model["latency"] and latency_setup:
        labels["latency_ms"] = f"latency (ms, {_latency_setup(data)})"
    if base is None:
        header = ["", "value"]
        rows = [[labels[k], _cell(k, _value(model, k))] for k in keys]
    else:
        header = ["", "base", "retrofitted", "Δ", "Δ %"]
        rows = [[labels[k], _cell(k, _value(base, k)), _cell(k, _value(model, k)),
                 _cell(k, data["delta"][k], signed=True), _percent(data["delta_percent"][k])] for k in keys]
    return header, rows


def _site_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["site", "block", "C×H×W", "params", "MACs", "element ops"]
    rows = [[s["key"], f"{s['block']} {s['setting']}", f"{s['channels']}×{s['height']}×{s['width']}",
             f"{s['params']:,}", _si(s["macs"]), _si(s["element_ops"])] for s in data["model"]["sites"]]
    sites = data["model"]["sites"]
    rows.append([f"all {len(sites)} sites", "", "", f"{sum(s['params'] for s in sites):,}",
                 _si(sum(s["macs"] for s in sites)), _si(sum(s["element_ops"] for s in sites))])
    return header, rows


def _replaced_note(data: dict[str, Any]) -> str | None:
    """For --replace-existing: the swapped SE modules' parameters, which the base holds (so Δ ≠ the rows' sum)."""
    sites = [s for s in data["model"]["sites"] if s["replaced"]]
    if not sites:
        return None
    new, old = sum(s["params"] for s in sites), sum(s["replaced_params"] for s in sites)
    kinds = ", ".join(sorted({s["replaced"] for s in sites}))
    return f"Δ params = {new:,} − {old:,} (the {len(sites)} {kinds} modules they replaced)"


def _title(data: dict[str, Any]) -> str:
    shape = "×".join(str(v) for v in [data["batch_size"], *data["input_size"]])
    base = f" · base {data['name']}" if data["base"] is not None else ""
    return f"{data['target']}{base} · input {shape}"


def _uncounted(data: dict[str, Any]) -> str | None:
    ops = data["uncounted_ops"]
    if not ops:
        return None
    return "ran without a counting rule (not in any total): " + ", ".join(f"{k} ×{n}" for k, n in ops.items())


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def _markdown(data: dict[str, Any], per_site: bool) -> str:
    header, rows = _metric_rows(data)
    header[0] = _title(data)
    lines = _md_table(header, rows)
    if per_site:
        lines += [""] + _md_table(*_site_rows(data))
    for note in (_replaced_note(data) if per_site else None, _latency_spread(data), _uncounted(data)):
        if note:
            lines += ["", note]
    return "\n".join(lines)


def _csv(data: dict[str, Any], per_site: bool) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if per_site:
        writer.writerow(_SITE_COLUMNS)
        for s in data["model"]["sites"]:
            writer.writerow([s[c] for c in _SITE_COLUMNS])
        return buf.getvalue()
    model, base = data["model"], data["base"]
    keys = [k for k, _ in _METRICS if k != "latency_ms" or model["latency"]]
    if base is None:
        writer.writerow(["metric", "value"])
        writer.writerows([k, _value(model, k)] for k in keys)
    else:
        writer.writerow(["metric", "base", "retrofitted", "delta", "delta_percent"])
        for k in keys:
            pct = data["delta_percent"][k]
            writer.writerow([k, _value(base, k), _value(model, k), data["delta"][k],
                             "" if pct is None else f"{pct:.4f}"])
    return buf.getvalue()


def _print_rich(data: dict[str, Any], per_site: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    header, rows = _metric_rows(data, latency_setup=False)
    console.print(_title(data), style="bold", markup=False)
    table = Table()
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if data["model"]["latency"]:
        console.print(f"latency: {_latency_setup(data)}", markup=False)
        console.print(_latency_spread(data), markup=False)
    if per_site:
        header, rows = _site_rows(data)
        sites = Table(title=f"{len(rows) - 1} attention blocks", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True)
        for i, h in enumerate(header):
            sites.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
        for row in rows[:-1]:
            sites.add_row(*row)
        sites.add_section()
        sites.add_row(*rows[-1])
        console.print(sites)
        replaced = _replaced_note(data)
        if replaced:
            console.print(replaced, markup=False)
    note = _uncounted(data)
    if note:
        console.print(note, markup=False)
