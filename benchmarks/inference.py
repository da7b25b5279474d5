"""Inference latency: retrofit's ECA against timm's hand-written ECA-ResNet and the bare ResNet.

Four models, measured in one run, interleaved (a, b, c, d, then b, c, d, a, …) so that load from
other processes on a shared machine hits all four alike:

* **a** — timm ``resnet50d`` + ``retrofit.add_attention(model, "eca")`` (identity init);
* **b** — timm ``ecaresnet50d``: the same math (ECA after ``bn3``, before the addition, same
  adaptive k per stage), written by hand;
* **c** — timm ``resnet50d`` alone;
* **d** — **a** with every gate swapped for ``nn.Identity``: the rewritten owners' own cost.

Random weights (no download), eval mode, ``torch.inference_mode``, batch 8, 224×224, float32,
on CPU and, when present, CUDA (timed with CUDA events after a synchronize). Each model gets
``--warmup`` untimed calls, then ``--repeats`` rounds of one timed call each; the median time
is reported, and each ratio is the median over rounds of the within-round ratio (calls of one
round run back to back, so they share the machine's load; goals: a/b ≤ 1.00, a/c ≤ 1.03).

Usage::

    python benchmarks/inference.py                      # prints a markdown table
    python benchmarks/inference.py --write docs/benchmarks.md   # replaces its "Inference" section
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Inference"


def build_models(device: str) -> dict[str, "torch.nn.Module"]:
    """The four models, in eval mode on ``device``: ``{"a": …, "b": …, "c": …, "d": …}``."""
    import timm
    import torch
    from torch import nn

    from retrofit import add_attention

    torch.manual_seed(0)
    base = timm.create_model("resnet50d", pretrained=False)

    def retrofitted() -> tuple[nn.Module, list]:
        model = timm.create_model("resnet50d", pretrained=False)
        model.load_state_dict(base.state_dict())
        return add_attention(model, "eca", input_size=(3, 224, 224))

    eca_model, _ = retrofitted()
    bare, inserted = retrofitted()
    for site in inserted:
        setattr(bare.get_submodule(site.owner), site.attr, nn.Identity())
    eca = timm.create_model("ecaresnet50d", pretrained=False)
    models = {"a": eca_model, "b": eca, "c": base, "d": bare}
    return {name: m.to(device).eval() for name, m in models.items()}


def timer(device: str) -> Callable[[Callable[[], object]], dict[str, float]]:
    """A function that runs a call once and returns its times in seconds: ``wall`` always, and
    on CPU also ``cpu``, the process's CPU time (on one thread, latency without the time other
    processes of a shared machine held the core)."""
    import torch

    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run(call: Callable[[], object]) -> dict[str, float]:
            torch.cuda.synchronize()
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            return {"wall": start.elapsed_time(end) / 1000.0}

        return run

    def run_cpu(call: Callable[[], object]) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}

    return run_cpu


def measure(device: str, batch: int, size: int, warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per clock (``wall``, and ``cpu`` on CPU): the median seconds per forward of each model
    (keys a, b, c, d), measured interleaved, and the median within-round ratios (keys ``a/b``,
    ``a/c``, ``d/c``)."""
    import torch

    models = build_models(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    run = timer(device)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode():
        reference = models["c"](x)
        for name in ("a", "d"):
            diff = (models[name](x) - reference).abs().max().item()
            if diff > 1e-5 * max(1.0, reference.abs().max().item()):
                raise SystemExit(f"model {name}'s outputs differ from resnet50d's by {diff}: identity init is broken")
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for i in range(repeats):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(run(lambda m=models[name]: m(x)))
    results = {}
    for clock in times["a"][0]:
        series = {name: [t[clock] for t in ts] for name, ts in times.items()}
        result = {name: statistics.median(ts) for name, ts in series.items()}
        for num, den in (("a", "b"), ("a", "c"), ("d", "c")):
            result[f"{num}/{den}"] = statistics.median(p / q for p, q in zip(series[num], series[den]))
        results[clock] = result
    return results


def render(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace, threads: int) -> str:
    """The markdown "Inference" section."""
    import timm
    import torch

    lines = [
        SECTION,
        "",
        f"`python benchmarks/inference.py --write docs/benchmarks.md` (batch {args.batch}, {args.size}×{args.size}, "
        f"float32, eval, `inference_mode`; median of {args.repeats} interleaved rounds after {args.warmup} warm-up "
        f"calls each; torch {torch.__version__}, timm {timm.__version__}).",
        "",
        "* **a** — timm `resnet50d` + `retrofit.add_attention(model, \"eca\")`, identity init (16 ECA gates)",
        "* **b** — timm `ecaresnet50d` (the same ECA placement and kernel sizes, hand-written)",
        "* **c** — timm `resnet50d` alone",
        "* **d** — **a** with its 16 gates swapped for `nn.Identity`: what the rewritten owners themselves cost",
        "",
        "Ratios are medians of the ratio within each round (the calls of a round run back to back). On CPU",
        "the process's CPU time is given too: on one thread it is the latency less the time other",
        "processes held the core. d/c is what the rewritten owners cost by themselves (their regenerated",
        "forward keeps `x += shortcut` in place, so it should be 1.00 within noise); a/d is ECA's own",
        "arithmetic — a mean and a multiply over every gated map — which b pays as well.",
        "",
        "| device | clock | a (ms) | b (ms) | c (ms) | d (ms) | a/b (goal ≤ 1.00) | a/c (goal ≤ 1.03) | d/c |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for device, clocks in results.items():
        where = f"CPU ({_cpu_name()}), {threads} thread(s)" if device == "cpu" else f"CUDA ({torch.cuda.get_device_name()})"
        for clock, r in clocks.items():
            lines.append(
                f"| {where} | {'wall' if clock == 'wall' else 'CPU time'} | {1e3 * r['a']:.1f} | {1e3 * r['b']:.1f} | "
                f"{1e3 * r['c']:.1f} | {1e3 * r['d']:.1f} | {r['a/b']:.3f} | {r['a/c']:.3f} | {r['d/c']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(path: Path, section: str) -> None:
    """Replace the "## Inference" section of ``path`` (up to the next ``## `` heading), or add it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    parser.add_argument("--write", type=Path, help="markdown file whose Inference section to replace")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        results[device] = measure(device, args.batch, args.size, args.warmup, args.repeats)
    section = render(results, args, torch.get_num_threads())
    print(section)
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
