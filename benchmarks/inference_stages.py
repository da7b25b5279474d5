"""Where the fused gate saves time: SE-/ECA-ResNet-50 stage by stage, retrofit vs timm's hand-written blocks.

``benchmarks/inference.py`` times whole models; a call there takes about 1.5 s on one CPU thread, and
on a shared VM one call's time wanders by ±5 % (the host's load, which no CPU clock of the guest
sees). This script times the four stages (``layer1`` … ``layer4``) of three models on the same
input maps, interleaved per round (calls of 0.1–0.4 s, so a round's calls share the host's load):

* **e** — timm ``resnet50`` + ``retrofit.add_attention(model, "se")`` (r = 16, identity init: the
  gate is exactly 1, so e computes what c does); with ``--block eca``, ``resnet50d`` + ECA;
* **f** — timm ``seresnet50`` (the same SE, hand-written: multiply, then add), or ``ecaresnet50d``;
* **c** — timm ``resnet50`` (or ``resnet50d``) alone.

The fused gate saves one pass over every gated map (the multiply's write and the addition's
re-read), so its saving grows with the map: most in ``layer1`` (256 × 56 × 56 per image), least in
``layer4`` (2048 × 7 × 7). Random weights, eval, ``inference_mode``, float32, one thread.

    python benchmarks/inference_stages.py                     # NCHW and channels_last
    python benchmarks/inference_stages.py --block eca --layouts channels_last --rounds 60
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("layer1", "layer2", "layer3", "layer4")
MODELS = {"se": ("resnet50", "seresnet50"), "eca": ("resnet50d", "ecaresnet50d")}  # block: (base, hand-written)


def stage_inputs(model, x):
    """The input map of each stage of a timm ResNet: ``{"layer1": (N, 64, H/4, W/4), …}``."""
    h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    inputs = {}
    for name in STAGES:
        inputs[name] = h
        h = getattr(model, name)(h)
    return inputs


def measure(block: str, layout: str, batch: int, rounds: int) -> list[dict[str, float]]:
    """Per stage: median ms of e, f, c and the median within-round ratios e/f and e/c."""
    import timm
    import torch

    from retrofit import add_attention

    torch.manual_seed(0)
    base, native = MODELS[block]
    models = {
        "e": add_attention(timm.create_model(base), block, input_size=(3, 224, 224))[0],
        "f": timm.create_model(native),
        "c": timm.create_model(base),
    }
    x = torch.randn(batch, 3, 224, 224)
    if layout == "channels_last":
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    models = {k: m.eval() for k, m in models.items()}
    rows = []
    with torch.inference_mode():
        inputs = stage_inputs(models["c"], x)
        for stage, inp in inputs.items():
            calls = {k: getattr(m, stage) for k, m in models.items()}
            for call in calls.values():
                call(inp)
            times: dict[str, list[float]] = {k: [] for k in calls}
            order = list(calls)
            for i in range(rounds):
                for k in order[i % 3:] + order[: i % 3]:
                    start = time.perf_counter()
                    calls[k](inp)
                    times[k].append(time.perf_counter() - start)
            row = {"stage": stage, **{k: 1e3 * statistics.median(ts) for k, ts in times.items()}}
            for num, den in (("e", "f"), ("e", "c")):
                row[f"{num}/{den}"] = statistics.median(p / q for p, q in zip(times[num], times[den]))
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", default="se", choices=sorted(MODELS))
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.block}: e = retrofit on {MODELS[args.block][0]}, f = {MODELS[args.block][1]}, c = {MODELS[args.block][0]}")
    print()
    print("| layout | stage | e (ms) | f (ms) | c (ms) | e/f | e/c |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for layout in args.layouts.split(","):
        rows = measure(args.block, layout, args.batch, args.rounds)
        for r in rows:
            print(f"| {layout} | {r['stage']} | {r['e']:.1f} | {r['f']:.1f} | {r['c']:.1f} | {r['e/f']:.3f} | {r['e/c']:.3f} |")
        total = {k: sum(r[k] for r in rows) for k in "efc"}
        print(f"| {layout} | all four (sum of medians) | {total['e']:.1f} | {total['f']:.1f} | {total['c']:.1f} "
              f"| {total['e'] / total['f']:.3f} | {total['e'] / total['c']:.3f} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
