"""Training-step speed: ``retrofit finetune``'s train loop vs a minimal plain PyTorch loop.

Both loops train the same model (a copy of one retrofitted model), on the same batches already
in memory (on the device), with the same optimizer (AdamW), loss (cross-entropy with the same
label smoothing) and precision. The retrofit side is :meth:`retrofit.train.loop.Trainer.train_one_epoch`
— the very code ``retrofit finetune`` runs, with its parameter groups, per-step schedule,
loss checks and accumulation logic; the plain side is::

    for x, y in batches:
        with autocast: loss = F.cross_entropy(model(x), y, label_smoothing=ls)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

Rounds alternate plain / retrofit (ABBA order) so that a machine whose load drifts slows both
alike; the report gives the median images/s of each and their ratio (goal: ≥ 0.95 on CPU), and
images per CPU-second of the process — on a CPU shared with other jobs, wall-clock rates swing
while CPU time per image stays put, so that ratio is the steadier one there. On CUDA the
benchmark runs fp32 and then bf16 autocast + channels_last.

    python benchmarks/train.py                         # Lite0 + ECA, 64 px, batch 32, CPU
    python benchmarks/train.py --img-size 224 --batch-size 128 --batches 20   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from retrofit import add_attention, load_model
from retrofit.train import distributed
from retrofit.train.config import FinetuneConfig
from retrofit.train.loop import Trainer
from retrofit.train.model import replace_head


def plain_epoch(model, optimizer, batches, autocast_dtype, device, label_smoothing) -> None:
    model.train()
    for x, y, _ in batches:
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast(device.type, enabled=False)
        with ctx:
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def timed(fn, device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of ``fn()``, CUDA work included via synchronize."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(args, device, precision: str, channels_last: bool) -> dict:
    torch.manual_seed(0)
    base, _, _ = load_model(args.model, pretrained=False)
    if args.block != "none":
        base, _ = add_attention(base, args.block)
    replace_head(base, args.classes)

    config = FinetuneConfig(source=args.model, data="in-memory", output="-", batch_size=args.batch_size,
                            epochs=1, warmup_epochs=0, lr=1e-4, device=device.type, precision=precision,
                            channels_last=channels_last, ema=args.ema,
                            bn_stats="train")  # the plain loop it is timed against trains BatchNorm statistics
    trainer = Trainer(config, distributed.Dist(0, 1, 0, device))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(device, memory_format=fmt),
         torch.randint(0, args.classes, (args.batch_size,), generator=gen).to(device), [])
        for _ in range(args.batches)
    ]
    plain_model = copy.deepcopy(base).to(device, memory_format=fmt)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-4, weight_decay=0.05)
    trainer.prepare(copy.deepcopy(base), len(batches))
    trainer.enter_phase(False)
    dtype = trainer.autocast_dtype

    def run_plain():
        plain_epoch(plain_model, plain_opt, batches, dtype, device, config.label_smoothing)

    def run_retrofit():
        trainer.train_one_epoch(0, batches)

    run_plain(), run_retrofit()  # warm-up: allocator, oneDNN/cuDNN kernels
    plain, ours = [], []
    for r in range(args.rounds):  # ABBA order: neither side always runs first
        if r % 2 == 0:
            plain.append(timed(run_plain, device))
            ours.append(timed(run_retrofit, device))
        else:
            ours.append(timed(run_retrofit, device))
            plain.append(timed(run_plain, device))
    images = args.batch_size * args.batches
    p, o = (statistics.median(images / wall for wall, _ in side) for side in (plain, ours))
    # CPU seconds per image barely move when other jobs share the cores (wall time does)
    p_cpu, o_cpu = (images / sum(cpu for _, cpu in side) * len(side) for side in (plain, ours))
    return {
        "device": str(device), "precision": "bf16 autocast" if dtype else "fp32", "channels_last": channels_last,
        "model": args.model, "block": args.block, "img_size": args.img_size, "batch_size": args.batch_size,
        "batches": args.batches, "rounds": args.rounds, "threads": torch.get_num_threads(), "ema": args.ema,
        "plain_images_per_s": round(p, 2), "retrofit_images_per_s": round(o, 2), "ratio": round(o / p, 4),
        "plain_images_per_cpu_s": round(p_cpu, 2), "retrofit_images_per_cpu_s": round(o_cpu, 2),
        "cpu_ratio": round(o_cpu / p_cpu, 4),
        "plain_rounds": [round(images / w, 2) for w, _ in plain], "retrofit_rounds": [round(images / w, 2) for w, _ in ours],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--block", default="eca", help="block to insert first, or none")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6, help="batches per timed epoch")
    parser.add_argument("--rounds", type=int, default=5, help="alternating plain/retrofit rounds")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--ema", action="store_true", help="retrofit side also updates timm's EMA (extra work)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.resolve_device(args.device)
    variants = [("fp32", False)] + ([("bf16", True)] if device.type == "cuda" else [])
    results = [measure(args, device, precision, cl) for precision, cl in variants]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        print(f"{r['model']}+{r['block']} {r['img_size']}px batch {r['batch_size']} on {r['device']} "
              f"({r['precision']}, channels_last={r['channels_last']}, {r['threads']} threads): "
              f"plain {r['plain_images_per_s']:.1f} img/s, retrofit {r['retrofit_images_per_s']:.1f} img/s, "
              f"ratio {r['ratio']:.3f}; per CPU second: plain {r['plain_images_per_cpu_s']:.1f}, retrofit "
              f"{r['retrofit_images_per_cpu_s']:.1f}, ratio {r['cpu_ratio']:.3f}  "
              f"(rounds, img/s: plain {r['plain_rounds']}, retrofit {r['retrofit_rounds']})")


if __name__ == "__main__":
    main()
