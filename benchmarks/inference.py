"""Inference latency: retrofit's SE / ECA against timm's hand-written SE-/ECA-ResNets and the bare ResNets.

Five models, measured in one run, interleaved (a, b, c, e, f, then b, c, e, f, a, …) so that load
from other processes on a shared machine hits all alike:

* **a** — timm ``resnet50d`` + ``retrofit.add_attention(model, "eca")`` (identity init);
* **b** — timm ``ecaresnet50d``: the same math (ECA after ``bn3``, before the addition, same
  adaptive k per stage), written by hand;
* **c** — timm ``resnet50d`` alone;
* **e** — timm ``resnet50`` + ``retrofit.add_attention(model, "se")`` (r = 16);
* **f** — timm ``seresnet50``: the same SE, written by hand.

retrofit fuses each gate into its residual addition (``shortcut + branch · gate`` as one
``addcmul``, in place under ``inference_mode``); the hand-written models multiply, then add.
Random weights (no download), eval mode, ``torch.inference_mode``, batch 8, 224×224, float32, in
the default (NCHW) and the ``channels_last`` memory format, on CPU and, when present, CUDA (timed
with CUDA events after a synchronize; bfloat16 autocast there). Each model gets ``--warmup``
untimed calls, then ``--repeats`` rounds of one timed call each; the median time is reported, and
each ratio is the median over rounds of the within-round ratio (calls of one round run back to
back, so they share the machine's load); "best" is the ratio of the fastest calls. Goals (issue 11):
a/b ≤ 0.98, a/c ≤ 1.025, e/f ≤ 0.98. On one CPU thread a call of one model takes about 1.5 s, so the
default 61 rounds of both layouts take about 16 minutes; a call's time wanders by ±5 % on a shared VM,
and 21 rounds leave the medians ±3 % apart from run to run (docs/benchmarks.md).

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
    """The five models, in eval mode on ``device``: ``{"a": …, "b": …, "c": …, "e": …, "f": …}``."""
    import timm
    import torch

    from retrofit import add_attention

    torch.manual_seed(0)
    resnet50d, resnet50 = timm.create_model("resnet50d"), timm.create_model("resnet50")

    def retrofitted(base, name: str, block: str):
        model = timm.create_model(name)
        model.load_state_dict(base.state_dict())
        return add_attention(model, block, input_size=(3, 224, 224))[0]

    models = {
        "a": retrofitted(resnet50d, "resnet50d", "eca"),
        "b": timm.create_model("ecaresnet50d"),
        "c": resnet50d,
        "e": retrofitted(resnet50, "resnet50", "se"),
        "f": timm.create_model("seresnet50"),
    }
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


RATIOS = (("a", "b", 0.98), ("a", "c", 1.025), ("e", "f", 0.98))


def measure(device: str, batch: int, size: int, warmup: int, repeats: int, channels_last: bool) -> dict[str, dict[str, float]]:
    """Per clock (``wall``, and ``cpu`` on CPU): the median seconds per forward of each model,
    measured interleaved, and the median within-round ratios (keys ``a/b``, ``a/c``, ``e/f``)."""
    import contextlib

    import torch

    models = build_models(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        models = {name: m.to(memory_format=torch.channels_last) for name, m in models.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    run = timer(device)
    times: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    names = list(models)
    with torch.inference_mode(), autocast:
        y, want = models["a"](x).float(), models["c"](x).float()  # identity init: a computes what c does
        if (y - want).abs().max().item() > 1e-2 * max(1.0, want.abs().max().item()):
            raise SystemExit("a's outputs differ from resnet50d's: identity init is broken")
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
        for num, den, _ in RATIOS:
            result[f"{num}/{den}"] = statistics.median(p / q for p, q in zip(series[num], series[den]))
            result[f"{num}/{den} spread"] = _spread([p / q for p, q in zip(series[num], series[den])])
            result[f"{num}/{den} best"] = min(series[num]) / min(series[den])
        results[clock] = result
    return results


def _spread(values: list[float]) -> float:
    """Half the interquartile range of the per-round ratios: how much one round's ratio wanders."""
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return (q[2] - q[0]) / 2


def render(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace, threads: int) -> str:
    """The markdown "Inference" section."""
    import timm
    import torch

    lines = [
        SECTION,
        "",
        f"`python benchmarks/inference.py --write docs/benchmarks.md` (batch {args.batch}, {args.size}×{args.size}, "
        f"eval, `inference_mode`; float32 on CPU, bfloat16 autocast on CUDA; median of {args.repeats} interleaved "
        f"rounds after {args.warmup} warm-up calls each; torch {torch.__version__}, timm {timm.__version__}).",
        "",
        "* **a** — timm `resnet50d` + `retrofit.add_attention(model, \"eca\")`, identity init (16 ECA gates)",
        "* **b** — timm `ecaresnet50d` (the same ECA placement and kernel sizes, hand-written)",
        "* **c** — timm `resnet50d` alone",
        "* **e** — timm `resnet50` + `retrofit.add_attention(model, \"se\")`, r = 16",
        "* **f** — timm `seresnet50` (the same SE, hand-written)",
        "",
        "retrofit fuses each gate into the residual addition (`shortcut + branch · gate`, one `addcmul`, in place",
        "under `inference_mode`), which saves one pass over every gated map, and on layer1's large maps squeezes",
        "the bottleneck's 4× narrower inner map (`retrofit.squeeze`); the hand-written models multiply and then",
        "add. Ratios are medians of the ratio within each round (± half its interquartile range over",
        "the rounds); \"best\" is the ratio of the fastest calls of each model (as `timeit` reports: load from",
        "elsewhere only ever adds time). On CPU the process's CPU time is given too: on one thread it is the",
        "latency less the time other processes of this machine held the core (not what a VM's host takes).",
        "",
        "| device | layout | clock | a (ms) | b (ms) | c (ms) | e (ms) | f (ms) | a/b (goal ≤ 0.98) | a/c (goal ≤ 1.025) "
        "| e/f (goal ≤ 0.98) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (device, layout), clocks in results.items():
        where = f"CPU ({_cpu_name()}), {threads} thread(s)" if device == "cpu" else f"CUDA ({torch.cuda.get_device_name()})"
        for clock, r in clocks.items():
            ratios = " | ".join(
                f"{r[f'{n}/{d}']:.3f} ± {r[f'{n}/{d} spread']:.3f} (best {r[f'{n}/{d} best']:.3f})" for n, d, _ in RATIOS
            )
            times = " | ".join(f"{1e3 * r[k]:.1f}" for k in "abcef")
            lines.append(f"| {where} | {layout} | {'wall' if clock == 'wall' else 'CPU time'} | {times} | {ratios} |")
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
    parser.add_argument("--repeats", type=int, default=61)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped when absent")
    parser.add_argument("--layouts", default="nchw,channels_last", help="memory formats, comma-separated")
    parser.add_argument("--write", type=Path, help="markdown file whose Inference section to replace")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        for layout in args.layouts.split(","):
            results[(device, layout)] = measure(
                device, args.batch, args.size, args.warmup, args.repeats, channels_last=layout == "channels_last"
            )
    section = render(results, args, torch.get_num_threads())
    print(section)
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
