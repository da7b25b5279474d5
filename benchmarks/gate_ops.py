"""What a gate costs, op by op: the inference ratios of benchmarks/inference.py rebuilt from short timings.

A whole ResNet-50 call (batch 8, one CPU thread) takes about 1.4 s and wanders by 5–10 % on a shared VM,
more than the 1–3 % the goals of issue 11 are about. The five models of ``inference.py`` differ only in
what happens at the 16 residual additions, so the differences can be timed there instead, on maps of
each stage's shape, in calls of 0.1–10 ms that a median over many repeats pins down:

* bare (c): ``y += shortcut`` (timm's Bottleneck);
* hand-written gate (b, f): ``y.mean`` → gate → ``y * g`` (a new map) → ``+= shortcut``;
* retrofit (a, e): the same gate, then ``addcmul`` into ``y`` (one pass, no new map), and on layer1
  (``retrofit.squeeze.PAYOFF``) the squeeze of the inner map ``z`` through the pooled 1×1 conv and BN:
  retrofit's own ``squeeze.projected_squeeze`` and ``rewrite.gated_add``, not copies of them.

The hand-written side uses retrofit's blocks with paper init (timm's ECA / SE run the same ops), the
retrofit side identity init (one more multiply, on the pooled vector), as in inference.py.
Summed over the blocks (3, 4, 6, 3) and added to a measured bare call, they give
``a/b = (c + Δa) / (c + Δb)``, ``a/c = 1 + Δa / c`` and ``e/f = (c' + Δe) / (c' + Δf)`` (c' the bare
``resnet50``). It leaves out what the graph around the blocks adds (a GraphModule's Python, ≈ µs per
node); inference.py measures the whole models.

Usage::

    python benchmarks/gate_ops.py --threads 1          # NCHW and channels_last
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: ResNet-50's stages at 224²: (bottleneck width C_in, output channels C, map side, blocks).
STAGES = ((64, 256, 56, 3), (128, 512, 28, 4), (256, 1024, 14, 6), (512, 2048, 7, 3))


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls after 3 untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def block_costs(batch: int, channels_last: bool, repeats: int) -> dict[str, float]:
    """Milliseconds over the bare addition, summed over ResNet-50's 16 blocks: ``eca_hand``,
    ``eca_retrofit``, ``se_hand``, ``se_retrofit``."""
    import torch
    from torch import nn

    from retrofit.blocks import EfficientChannelAttention, SqueezeExcite, eca_kernel_size, se_hidden_width
    from retrofit.rewrite import gated_add
    from retrofit.squeeze import projected_squeeze

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    total = {"eca_hand": 0.0, "eca_retrofit": 0.0, "se_hand": 0.0, "se_retrofit": 0.0}
    for c_in, c, side, blocks in STAGES:
        y = torch.randn(batch, c, side, side).contiguous(memory_format=fmt)
        z = torch.randn(batch, c_in, side, side).contiguous(memory_format=fmt)
        shortcut = torch.randn_like(y)
        conv = nn.Conv2d(c_in, c, 1, bias=False).eval().to(memory_format=fmt)
        bn = nn.BatchNorm2d(c).eval()
        gates = {  # (hand-written, retrofit): the paper's gate, and retrofit's identity init (2·sigmoid)
            "eca": [EfficientChannelAttention(c, eca_kernel_size(c), init=i).eval() for i in ("paper", "identity")],
            "se": [SqueezeExcite(c, se_hidden_width(c, 16, 8), init=i).eval() for i in ("paper", "identity")],
        }
        bare = median_ms(lambda: y.add_(shortcut), repeats)
        for name, (hand_gate, gate) in gates.items():
            def hand():
                y.mul(hand_gate.gate(y)).add_(shortcut)

            def retrofit():  # what the rewritten owner runs: its squeeze rule and its fused addition
                gated_add(shortcut, y, gate.gate(projected_squeeze(y, z, conv, bn)), into="gated")

            total[f"{name}_hand"] += blocks * (median_ms(hand, repeats) - bare)
            total[f"{name}_retrofit"] += blocks * (median_ms(retrofit, repeats) - bare)
    return total


def bare_call_ms(name: str, batch: int, channels_last: bool, calls: int) -> float:
    """Median milliseconds of a whole forward of timm ``name`` (random weights, eval)."""
    import timm
    import torch

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model(name).eval().to(memory_format=fmt)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)
    return median_ms(lambda: model(x), calls)


def main(argv: list[str] | None = None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=41, help="timed calls of each op sequence")
    parser.add_argument("--calls", type=int, default=9, help="timed whole calls of each bare model")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| layout | bare resnet50d (ms) | bare resnet50 (ms) | Δ hand ECA | Δ retrofit ECA | Δ hand SE | Δ retrofit SE "
          "| a/b | a/c | e/f |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for channels_last in (False, True):
            d = block_costs(args.batch, channels_last, args.repeats)
            c = bare_call_ms("resnet50d", args.batch, channels_last, args.calls)
            c2 = bare_call_ms("resnet50", args.batch, channels_last, args.calls)
            a, b = c + d["eca_retrofit"], c + d["eca_hand"]
            e, f = c2 + d["se_retrofit"], c2 + d["se_hand"]
            print(f"| {'channels_last' if channels_last else 'nchw'} | {c:.1f} | {c2:.1f} | {d['eca_hand']:.1f} "
                  f"| {d['eca_retrofit']:.1f} | {d['se_hand']:.1f} | {d['se_retrofit']:.1f} "
                  f"| {a / b:.3f} | {a / c:.3f} | {e / f:.3f} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
