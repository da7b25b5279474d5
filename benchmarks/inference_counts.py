"""Inference counted, not timed: instructions and simulated cache misses under valgrind's callgrind.

The deterministic companion of ``benchmarks/inference.py`` (issue 18). On a shared 2-core VM a
call of ResNet-50 wanders by CV 9–15 % from call to call, more than the 2 % the goals ask to
decide; the number of instructions a call executes, and the cache misses a simulated cache sees,
do not depend on what else runs. Hardware counters would do too, where the kernel exposes them
(``perf stat -e instructions`` answers "not supported" in this VM).

The same five models as ``inference.py`` (a: resnet50d + retrofit ECA, b: timm ecaresnet50d,
c: resnet50d, e: resnet50 + retrofit SE, f: timm seresnet50; random weights, eval,
``inference_mode``, float32, NCHW, one thread), at 224×224 but **batch 1** (under valgrind a call
runs ~50–100× slower). Each family (a, b, c; e, f) runs in one process under
``valgrind --tool=callgrind --instr-atstart=no --cache-sim=yes``: import, build, retrofit and one
warm-up call run uninstrumented; then a client request (a four-line C shim, compiled here with
``gcc``) switches instrumentation on, and exactly one call is counted (``CALLGRIND_TOGGLE_COLLECT``
around it, dumped under the model's letter). An uncounted instrumented call runs first, so no counted call starts
from empty simulated caches.

Reported per model: ``Ir`` (instructions executed), L1 misses (instruction + data), LL misses
(last level), and callgrind's cycle estimate ``CEst = Ir + 10·L1 misses + 100·LL misses`` (the
formula KCachegrind shows as "Cycle Estimation"). **CEst decides the goals** (a/b ≤ 0.98,
a/c ≤ 1.025, e/f ≤ 0.98): the fused gate's saving is a pass over memory, which ``Ir`` alone
undercounts. What no count here sees: the kernel's page faults (time, not instructions, of the
process), and the host's real caches and clock.

Usage::

    python benchmarks/inference_counts.py                      # prints the markdown section
    python benchmarks/inference_counts.py --write docs/benchmarks.md
    python benchmarks/inference_counts.py --smoke              # 32 px, seconds of valgrind-free checks (CI)

On this 2-core VM, loaded ≈ 7 by other jobs, ``--size 112`` took 40 minutes (docs/benchmarks.md); 224 px takes longer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Inference: counted"
MODELS = "abcef"
#: The simulated last-level cache: 4 MiB, 16-way (valgrind would take this VM's reported L3, 256 MiB
#: direct-mapped, in which every map of a ResNet stays). At batch 1 a map is an eighth of what it is at
#: the goals' batch 8, so an eighth of a 32 MiB L3 keeps the ratio of maps to cache the goals have.
LL_BYTES = 4 * 2**20
RATIOS = (("a", "b", 0.98), ("a", "c", 1.025), ("e", "f", 0.98))
#: The callgrind client requests the child needs (valgrind/callgrind.h); no-ops outside valgrind.
SHIM = r"""
#include <valgrind/callgrind.h>
void rf_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void rf_toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
void rf_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""


def build_model(name: str, size: int):
    """One of the five models of ``benchmarks/inference.py``, eval mode, seeded weights (a and c,
    e and its base, share theirs)."""
    import timm
    import torch

    from retrofit import add_attention

    arch = {"a": "resnet50d", "b": "ecaresnet50d", "c": "resnet50d", "e": "resnet50", "f": "seresnet50"}[name]
    torch.manual_seed(0)
    model = timm.create_model(arch)
    if name in "ae":
        add_attention(model, "eca" if name == "a" else "se", input_size=(3, size, size))
    return model.eval()


def child(names: str, size: int, batch: int, shim: str | None, warm_cache: bool) -> None:
    """Run in one valgrind process: build the models ``names``, warm each up, then count one call of
    each (in that order, each dumped under its letter).

    With ``warm_cache`` one more call of the last model runs instrumented but uncounted first, so
    that every counted call starts from the simulated caches another model's call left, never empty.
    """
    import torch

    torch.set_num_threads(1)
    models = {name: build_model(name, size) for name in names}
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    requests = ctypes.CDLL(shim) if shim else None
    with torch.inference_mode():
        # warm-up: oneDNN builds its kernels, the allocator its pools, valgrind its translations
        want = {name: model(x).clone() for name, model in models.items()}
        if requests:
            requests.rf_start()
        if warm_cache:
            models[names[-1]](x)
        for name, model in models.items():
            if requests:
                requests.rf_toggle()
            got = model(x)
            if requests:
                requests.rf_toggle()
                requests.rf_dump(name.encode())
            if not torch.equal(got, want[name]):  # a stale translation of JIT code (--smc-check=stack) shows here
                raise SystemExit(f"model {name}: the counted call computed other outputs than the warm-up call")


def add_cost_child(size: int, shim: str | None) -> None:
    """Run in the valgrind process: one forward of bare timm ``resnet50`` on discovery's probe
    (batch 2, eval, ``no_grad``), then ``add_attention(model, "eca")``, each counted and dumped."""
    import timm
    import torch

    from retrofit import add_attention
    from retrofit.probe import probe_input

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("resnet50").eval()
    x = probe_input(model, (3, size, size))
    requests = ctypes.CDLL(shim) if shim else None
    with torch.no_grad():
        model(x)  # warm-up, as for the models above
    if requests:
        requests.rf_start()
    for label, call in (("forward", lambda: model(x)), ("add_attention", lambda: add_attention(model, "eca"))):
        if requests:
            requests.rf_toggle()
        with torch.no_grad() if label == "forward" else contextlib.nullcontext():
            call()
        if requests:
            requests.rf_toggle()
            requests.rf_dump(label.encode())


def compile_shim(folder: Path) -> Path:
    """The client-request shim as a shared library in ``folder``. Raises SystemExit without gcc or
    valgrind's headers."""
    if not shutil.which("gcc"):
        raise SystemExit("gcc is needed to build the callgrind client-request shim")
    source, library = folder / "shim.c", folder / "shim.so"
    source.write_text(SHIM)
    proc = subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cannot build the shim (valgrind's headers missing?): {proc.stderr.strip()[:300]}")
    return library


def parse_dump(text: str) -> dict[str, int]:
    """Event totals of one callgrind dump: ``{"Ir": …, "I1mr": …, …}`` from its ``events:`` and
    ``summary:`` lines (callgrind's own count of the events; ``totals:``, the sum of the listed
    costs, where a dump has no summary)."""
    events = totals = None
    for line in text.splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:") or (line.startswith("totals:") and totals is None):
            totals = [int(v) for v in line.split()[1:]]
    if events is None or totals is None:
        raise ValueError("not a callgrind dump: no events/totals lines")
    return dict(zip(events, totals + [0] * (len(events) - len(totals))))


def derived(counts: dict[str, int]) -> dict[str, int]:
    """``Ir``, ``L1m`` (I1 + D1 read/write misses), ``LLm`` (last level) and ``CEst``."""
    l1 = sum(counts.get(k, 0) for k in ("I1mr", "D1mr", "D1mw"))
    ll = sum(counts.get(k, 0) for k in ("ILmr", "DLmr", "DLmw"))
    return {"Ir": counts["Ir"], "L1m": l1, "LLm": ll, "CEst": counts["Ir"] + 10 * l1 + 100 * ll}


def find_dump(prefix: Path, label: str) -> Path:
    """The dump file callgrind wrote for ``CALLGRIND_DUMP_STATS_AT(label)`` (``<prefix>.1``, …)."""
    for path in sorted(prefix.parent.glob(prefix.name + "*")):
        text = path.read_text(errors="replace")
        if re.search(rf"^desc: Trigger: Client Request: {re.escape(label)}$", text, re.M):
            return path
    raise SystemExit(f"callgrind wrote no dump for {label!r} under {prefix}*")


def run_all(tasks: list[tuple[str, list[str], list[str]]], jobs: int, cache_sim: bool) -> dict[str, dict[str, int]]:
    """Run each ``(name, child arguments, dump labels)`` task in its own callgrind process, ``jobs`` at
    a time; the events of every labelled dump."""
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    folder = Path(tempfile.mkdtemp(prefix="retrofit-counts-"))
    shim = compile_shim(folder)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONPATH=str(ROOT))
    pending, running, results = list(tasks), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, arguments, labels = pending.pop(0)
            # --smc-check=stack: oneDNN's JIT kernels are written once, before the counted call, and
            # checking every block of them for rewrites made the run ~3× slower; the child compares
            # the counted call's outputs with the warm-up's, which a stale translation would break
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", "--smc-check=stack",
                   f"--cache-sim={'yes' if cache_sim else 'no'}", f"--LL={LL_BYTES},16,64",
                   f"--callgrind-out-file={folder / name}.out", sys.executable, str(Path(__file__).resolve()),
                   *arguments, "--shim", str(shim)]
            log = open(folder / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, labels,
                             time.time())
        time.sleep(2)
        for name, (proc, log, labels, start) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed under valgrind:\n{(folder / f'{name}.log').read_text()[-2000:]}")
            for label in labels:
                results[label] = parse_dump(find_dump(folder / f"{name}.out", label).read_text())
                print(f"{label}: {time.time() - start:.0f} s, Ir {results[label]['Ir']:,}", file=sys.stderr, flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return results


def render(counts: dict[str, dict[str, int]], size: int, batch: int, seconds: float, cache_sim: bool) -> str:
    """The markdown section: counts per model, then the ratios per measure, CEst deciding."""
    import timm
    import torch

    rows = {name: derived(c) for name, c in counts.items()}
    measures = ("CEst", "Ir", "L1m", "LLm") if cache_sim else ("Ir",)
    label = {"CEst": "CEst (decides)", "Ir": "Ir", "L1m": "L1 misses", "LLm": "LL misses"}
    lines = [
        SECTION,
        "",
        f"`python benchmarks/inference_counts.py --write docs/benchmarks.md` (valgrind callgrind, batch {batch}, "
        f"{size}×{size}, eval, `inference_mode`, float32, NCHW, one thread; one counted call per model after an "
        f"uncounted warm-up, a, b, c in one process and e, f in another; torch {torch.__version__}, timm {timm.__version__}; "
        f"{seconds / 60:.1f} min on this machine). The counts repeat exactly whatever the host's load: "
        "they decide the goals, and the wall-clock section above may only contradict them. "
        "CEst = Ir + 10 · L1 misses + 100 · LL misses (callgrind's cycle estimate).",
        "",
        "| model | " + " | ".join(label[m] for m in measures) + " |",
        "|---|" + "---:|" * len(measures),
    ]
    for name in MODELS:
        if name in rows:
            lines.append(f"| {name} | " + " | ".join(f"{rows[name][m]:,}" for m in measures) + " |")
    lines += ["", "| measure | " + " | ".join(f"{n}/{d} (goal ≤ {g})" for n, d, g in RATIOS) + " |",
              "|---|" + "---:|" * len(RATIOS)]
    for m in measures:
        cells = []
        for n, d, goal in RATIOS:
            if n in rows and d in rows:
                r = rows[n][m] / rows[d][m] if rows[d][m] else float("nan")
                cells.append(f"**{r:.4f}**" + (" ✓" if r <= goal else " ✗") if m == "CEst" else f"{r:.4f}")
            else:
                cells.append("–")
        lines.append(f"| {label[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, after: str = "## Inference\n") -> None:
    """Replace this section of ``path`` (up to the next ``## `` heading), or insert it before the
    heading that follows the wall-clock ``## Inference`` section (at the end without one)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        start = text.find(after)
        nxt = re.compile(r"^## ", re.M).search(text, start + len(after)) if start >= 0 else None
        if nxt:
            text = text[: nxt.start()] + section + "\n" + text[nxt.start():]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=MODELS, help="letters of the models to count (default abcef)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="valgrind processes at a time")
    parser.add_argument("--no-cache-sim", action="store_true", help="count instructions only (about 2× faster)")
    parser.add_argument("--write", type=Path, help="markdown file whose counted section to replace")
    parser.add_argument("--smoke", action="store_true",
                        help="32 px, no valgrind: build, retrofit and call each model once (what CI runs)")
    parser.add_argument("--add-cost", action="store_true",
                        help="instead: add_attention(resnet50, 'eca') in forwards of the bare model (Ir, batch 2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--add-cost-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shim", help=argparse.SUPPRESS)
    parser.add_argument("--warm-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.size, args.batch, args.shim, args.warm_cache)
        return
    if args.add_cost_child:
        add_cost_child(args.size, args.shim)
        return
    if set(args.models) - set(MODELS) or min(args.size, args.batch, args.jobs) < 1:
        parser.error(f"--models takes letters of {MODELS}; --size, --batch and --jobs must be ≥ 1")
    if args.smoke:
        child(args.models, 32, 1, None, warm_cache=True)
        print(f"smoke: {len(args.models)} model(s) built and called at 32 px")
        return
    start = time.time()
    if args.add_cost:
        counts = run_all([("add", ["--add-cost-child", "--size", str(args.size)], ["forward", "add_attention"])], 1,
                         cache_sim=False)
        ratio = counts["add_attention"]["Ir"] / counts["forward"]["Ir"]
        print(f"add_attention(resnet50, 'eca') at {args.size}×{args.size}: {counts['add_attention']['Ir']:,} "
              f"instructions = {ratio:.2f} forwards of the bare model on the probe ({counts['forward']['Ir']:,}); "
              f"{(time.time() - start) / 60:.1f} min")
        return
    # one process per family (the models that share their convolutions' shapes, hence oneDNN's kernels
    # and valgrind's translations): the warm-ups after the first cost little
    families = [f for f in ("".join(n for n in args.models if n in family) for family in ("abc", "ef")) if f]
    warm = ["--warm-cache"] if not args.no_cache_sim else []
    tasks = [(f, ["--child", f, "--size", str(args.size), "--batch", str(args.batch), *warm], list(f)) for f in families]
    counts = run_all(tasks, args.jobs, not args.no_cache_sim)
    section = render(counts, args.size, args.batch, time.time() - start, not args.no_cache_sim)
    print(section)
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
