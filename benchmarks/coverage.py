"""Coverage of the zoos: does retrofit work on every timm and torchvision classification model?

For each architecture (random init, ``pretrained=False``, eval mode, one CPU thread):

1. build it and find the smallest input it accepts (64×64 first, then 96, 128, then the
   model's default size);
2. take an **addition census** of one forward pass: every tensor addition, attributed to the
   module whose own code performs it, sorted into ``(N, C, H, W)`` feature-map additions of two
   activations of the same shape (residual-like), channels-last ``(N, H, W, C)`` map additions
   (Swin, VOLO, MambaOut), other 4-D additions (per-head tensors, windows), token additions
   (2-D/3-D, transformers) and others;
3. ``retrofit.add_attention(model, "eca")`` with identity init, at that input size;
4. check that eval-mode outputs equal the original's (max |Δ| ≤ 1e-5 · max(1, max|y|)), and
   train-mode outputs too (same RNG seed, so dropout / drop-path draw the same masks);
5. ``pickle.loads(pickle.dumps(model))``: every gate is called and the outputs are the same;
6. ``save_checkpoint`` to a temporary folder, ``load_checkpoint``, and compare eval outputs again.

Each model ends in one outcome:

* ``pass`` — sites inserted, outputs unchanged, checkpoint round trip exact;
* ``no-site`` — ``add_attention`` refuses with "no residual site" and the census agrees: the
  model adds no ``(N, C, H, W)`` residual maps (``channels-last``: Swin-style ``(N, H, W, C)``
  residuals; ``tokens-only``: transformers, whose residuals are token additions; neither is a
  site; ``no-additions``: VGG, DenseNet, …; ``other-additions``);
* ``fail`` — anything else, with the error: an engine exception, a refusal of a model whose
  census has residual additions, or (a bug) outputs that differ;
* ``skip`` — the sweep could not judge the model: too large for the sweep machine, over the
  time budget, or the *original* model does not run.

Usage (results are appended to a JSON-lines file, so a sweep can be stopped and resumed)::

    python benchmarks/coverage.py run                      # every model of both zoos
    python benchmarks/coverage.py run --zoo torchvision --models resnet50,vgg11
    python benchmarks/coverage.py report                   # writes docs/coverage.md

``run`` starts a worker process and restarts it after a model runs past ``--budget`` seconds or
crashes the interpreter, so one model cannot stall the sweep.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "coverage.jsonl"
DOC = ROOT / "docs" / "coverage.md"
#: Models with more parameters are skipped: a checkpoint round trip holds about three fp32
#: copies at once, more than the sweep machine (23 GiB, shared) can spare.
MAX_PARAMS = 1_000_000_000
SMALL_SIDES = (64, 96, 128)
RTOL = 1e-5
#: A worker retires after this many models: one that has checked hundreds of models runs each
#: several times slower than a fresh process does.
MODELS_PER_WORKER = 40
#: How an allocation refused by the worker's memory limit shows up in torch's errors.
_OUT_OF_MEMORY = ("can't allocate memory", "not enough memory", "bad_alloc", "MemoryError")


# --------------------------------------------------------------------------- model lists


def list_architectures(zoo: str) -> list[tuple[str, str]]:
    """``(zoo, name)`` of every classification architecture of ``zoo`` (``timm``/``torchvision``/``all``)."""
    out: list[tuple[str, str]] = []
    if zoo in ("torchvision", "all"):
        import torchvision

        out += [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    if zoo in ("timm", "all"):
        import timm

        out += [("timm", n) for n in timm.list_models()]
    return out


def family_of(zoo: str, name: str) -> str:
    """The source module that defines the architecture: timm ``resnet``, torchvision ``tv.resnet``."""
    if zoo == "torchvision":
        import torchvision

        return "tv." + torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    return _timm_families().get(name, "?")


_FAMILIES: dict[str, str] = {}


def _timm_families() -> dict[str, str]:
    if not _FAMILIES:
        import timm

        for module in timm.list_modules():
            for name in timm.list_models(module=module):
                _FAMILIES.setdefault(name, module)
    return _FAMILIES


def families_first(models: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``models`` reordered: the first model of each family, then the others (each in list order),
    so that a sweep stopped early has still seen every family."""
    seen: set[str] = set()
    first, rest = [], []
    for zoo, name in models:
        family = family_of(zoo, name)
        (rest if family in seen else first).append((zoo, name))
        seen.add(family)
    return first + rest


# --------------------------------------------------------------------------- the check


def count_params(zoo: str, name: str) -> int | None:
    """Parameter count from a build on the ``meta`` device (no memory, no init); None if that fails."""
    import torch

    from retrofit.models import ModelSpec, build

    try:
        with torch.device("meta"):
            model = build(ModelSpec(name if zoo == "timm" else f"torchvision:{name}", zoo))
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def _flat(out: Any) -> list:
    """The tensors of a model output (a tensor, or nested tuples/lists/dicts of them)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def max_difference(reference: Any, output: Any) -> float:
    """Largest |Δ| between two outputs relative to ``max(1, max|reference|)``; ``inf`` on a shape
    mismatch or when NaN/inf appear in different places."""
    import torch

    ref, got = _flat(reference), _flat(output)
    if len(ref) != len(got) or not ref:
        return math.inf
    worst = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            return math.inf
        a, b = a.double(), b.double()
        finite = torch.isfinite(a)
        if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()):
            return math.inf
        if finite.any():
            scale = max(1.0, a[finite].abs().max().item())
            worst = max(worst, (a[finite] - b[finite]).abs().max().item() / scale)
    return worst


def _input_sizes(model: Any) -> list[tuple[int, int, int]]:
    from retrofit.graph import default_input_size

    default = tuple(default_input_size(model))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = default[0]
    if cfg.get("fixed_input_size"):
        return [default]
    smallest = cfg.get("min_input_size") or (channels, 0, 0)
    sizes = [(channels, max(s, smallest[1]), max(s, smallest[2])) for s in SMALL_SIDES]
    sizes = [s for s in dict.fromkeys(sizes) if s[1] < default[1] or s[2] < default[2]]
    return sizes + [default]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _example(size: tuple[int, int, int]):
    import torch

    return torch.randn(2, *size, generator=torch.Generator().manual_seed(0))


def _forward(model: Any, x: Any, train: bool = False) -> Any:
    import torch

    model.train(train)
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(x)
    model.eval()
    return out


def _restore(buffers: list) -> None:
    import torch

    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)


class _OriginalFails(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def build_and_probe(zoo: str, name: str) -> tuple[Any, dict[str, Any], tuple[int, int, int], Any]:
    """Build the model (random init, seed 0) and find the smallest input it runs on.

    Tries 64, 96, 128 px as built, then — for timm models whose size is fixed by their position
    embeddings — a build with ``img_size=64`` or ``128`` (the same architecture with a smaller
    embedding table; the kwarg is recorded in the checkpoint's recipe), then the default size.

    Returns ``(model, kwargs, (C, H, W), eval output)``; raises :class:`_OriginalFails`.
    """
    import torch

    from retrofit import load_model

    def build(**kwargs: Any) -> Any:
        torch.manual_seed(0)
        try:
            return load_model(name if zoo == "timm" else f"torchvision:{name}", pretrained=False, **kwargs)[0]
        except Exception as e:
            raise _OriginalFails("build-error", _first_line(e)) from e

    if zoo == "timm" and _fixed_input_size(name):
        for side in (64, 128):
            try:
                small = build(img_size=side)
                size = (small.pretrained_cfg.get("input_size", (3,))[0], side, side)
                return small, {"img_size": side}, size, _forward(small, _example(size))
            except Exception:
                pass
    model = build()
    sizes = _input_sizes(model)
    for size in sizes[:-1]:
        try:
            return model, {}, size, _forward(model, _example(size))
        except Exception:
            pass
    if zoo == "timm":
        for side in (64, 128):
            size = (sizes[-1][0], side, side)
            if side >= sizes[-1][1]:
                break
            try:
                small = build(img_size=side)
                return small, {"img_size": side}, size, _forward(small, _example(size))
            except Exception:
                pass
    try:
        return model, {}, sizes[-1], _forward(model, _example(sizes[-1]))
    except Exception as e:
        raise _OriginalFails("original-fails", _first_line(e)) from e


def _fixed_input_size(name: str) -> bool:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg and cfg.fixed_input_size)


def addition_census(model: Any, x: Any) -> dict[str, Any]:
    """Every tensor addition of one eval forward, attributed to the module whose own code does it.

    ``x``: the probe batch ``(N, C, H, W)``. Returns ``{"residual": {owner: n}, "channels_last": n,
    "other_4d": n, "tokens": n, "other": n}``, counting additions of two same-shape activations
    (parameters and buffers excluded — those are biases and positional embeddings):

    * ``residual`` — ``(N, C, H, W)`` maps in a module whose input is such a map too (so not a
      convolutional position encoding inside a token module);
    * ``channels_last`` — Swin/VOLO/MambaOut-style ``(N, H, W, C)`` maps (see :func:`_on_grid`)
      in a module whose input is such a map too, counted only when *every* 4-D addition that
      module class makes in the forward is on such a grid: a class whose additions are on
      ``(N, h, w, C)`` at one stage and not at another (NesT's ``(N, blocks, tokens, C)``, which
      at 64 px reads ``(2, 16, 16, 96)`` in its first stage) holds no spatial map;
    * ``other_4d`` — the other 4-D additions: per-head tensors and attention logits
      ``(N, heads, L, ·)`` (rotary embeddings, relative position biases), windows ``(N·k, …)``,
      blocks of tokens, and ``(N, C, H, W)`` maps added inside modules that take tokens;
    * ``tokens`` — 2-D/3-D additions; ``other`` — the rest (broadcasts, scalars, constants).

    Unlike retrofit's fx analysis this sees inside modules that cannot be traced, so it tells
    whether a model that yields no site really has none.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    from retrofit.graph import is_feature_map

    adds = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__,
            torch.Tensor.__radd__}
    size = tuple(x.shape[1:])
    constants = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    stack: list[tuple[str, type | None, Any]] = [("", None, None)]  # (module path, class, first input)
    residual: Counter = Counter()
    counts = Counter()
    by_class: dict[type | None, list[bool]] = defaultdict(list)  # per 4-D addition: on a grid?

    class Census(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in adds and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
                a, b = args[0], args[1]
                path, cls, first = stack[-1]
                if id(a) in constants or id(b) in constants or a.shape != b.shape:
                    counts["other"] += 1
                elif is_map(a) and is_map(first):
                    residual[path] += 1
                elif a.dim() == 4:
                    by_class[cls].append(_on_grid(a.shape, size) and _on_grid(shape_of(first), size))
                elif a.dim() in (2, 3):
                    counts["tokens"] += 1
                else:
                    counts["other"] += 1
            return func(*args, **(kwargs or {}))

    def shape_of(t: Any) -> tuple:
        return tuple(t.shape) if isinstance(t, torch.Tensor) else ()

    def is_map(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and is_feature_map(t.shape, size)

    def enter(module: Any, args: tuple, path: str) -> None:
        stack.append((path, type(module), args[0] if args else None))

    def leave(module: Any, args: Any, output: Any) -> None:
        stack.pop()

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, path=path: enter(m, a, path)))
        handles.append(module.register_forward_hook(leave))
    try:
        with Census(), torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    for on_grid in by_class.values():
        counts["channels_last" if all(on_grid) else "other_4d"] += len(on_grid)
    return {"residual": dict(residual), **{k: counts[k] for k in ("channels_last", "other_4d", "tokens", "other")}}


def _on_grid(shape: tuple, input_size: tuple[int, int, int]) -> bool:
    """Whether ``shape`` reads as a channels-last ``(N, h, w, C)`` map of a ``(C, H, W)`` input.

    N is the probe batch and ``h × w`` the input's ``H × W`` over one stride: the aspect ratio
    within a pixel (:func:`retrofit.graph.is_feature_map` on the permuted shape), and no larger
    than the input. Attention logits ``(N, heads, L, L)`` and per-head tensors pass only when the
    head count happens to equal the token count, which :func:`addition_census`'s two further
    tests (the module's input is such a map too; its class adds such maps at every stage) catch.
    """
    from retrofit.graph import is_feature_map

    if len(shape) != 4:
        return False
    n, h, w, c = (int(d) for d in shape)
    return h <= input_size[1] and w <= input_size[2] and is_feature_map((n, c, h, w), input_size)


def no_site_kind(census: dict[str, Any]) -> str:
    """Why a model has no site, from its addition census (see :func:`addition_census`).

    Residual additions of channels-last ``(N, H, W, C)`` maps (Swin, VOLO, MambaOut blocks) make a
    model *channels-last* even when it also adds 3-D tokens (patch merging, heads). Otherwise a
    model that adds tokens — 3-D ``(N, L, C)``, or grouped in 4-D by head, window or block (NesT's
    ``(N, blocks, tokens, C)``, rotary embeddings' ``(N, heads, L, d)``) — is *tokens-only*.
    """
    if census["channels_last"]:
        return "channels-last"
    if census["tokens"] or census.get("other_4d"):
        return "tokens-only"
    return "other-additions" if census["other"] else "no-additions"


def check_model(zoo: str, name: str, workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the whole check on one architecture and return its JSON-ready record.

    Keys: ``zoo``, ``name``, ``family``, ``params``, ``input_size``, ``status`` (``pass``,
    ``no-site``, ``fail``, ``skip``), ``kind`` (sub-class of the status), ``reason`` (one line
    for non-passes), ``sites``, ``owners_without_site`` (census owners with residual additions
    that got no site), ``trace_failures``, ``census``, ``eval_diff``, ``train_diff``,
    ``pickle_diff``, ``pickle_gates_called`` (gates a forward of ``pickle.loads(pickle.dumps(model))``
    calls), ``reload_diff``, ``seconds``.
    """
    import torch

    from retrofit import RetrofitError, add_attention, load_checkpoint, save_checkpoint
    from retrofit.graph import _other_forward_paths, find_sites

    start = time.perf_counter()
    rec: dict[str, Any] = {"zoo": zoo, "name": name, "family": family_of(zoo, name)}

    def done(status: str, kind: str, reason: str = "") -> dict[str, Any]:
        rec.update(status=status, kind=kind, reason=reason, seconds=round(time.perf_counter() - start, 2))
        return rec

    rec["params"] = count_params(zoo, name)
    if rec["params"] is not None and rec["params"] > MAX_PARAMS:
        return done("skip", "too-large", f"{rec['params'] / 1e9:.2f} B parameters, over the sweep's limit")
    try:
        model, kwargs, size, reference = build_and_probe(zoo, name)
    except _OriginalFails as e:
        return done("skip", e.kind, e.reason)
    rec["input_size"], rec["kwargs"] = list(size), kwargs
    x = _example(size)
    census = addition_census(model, x)
    rec["census"] = census
    # a train-mode forward updates BatchNorm statistics: keep them to restore afterwards
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        reference_train = _forward(model, x, train=True)
    except Exception:
        reference_train = None
    _restore(buffers)

    try:
        model, inserted = add_attention(model, "eca", input_size=size)
    except RetrofitError as e:
        message = str(e)
        if census["residual"]:
            return done("fail", "refused", message)
        if message.startswith("no residual site"):
            return done("no-site", no_site_kind(census), message)
        return done("fail", "refused", message)
    except Exception as e:
        return done("fail", "engine-error", _first_line(e))
    rec["sites"] = len(inserted)
    owners = {s.owner for s in inserted}
    rec["owners_without_site"] = sorted(o for o in census["residual"] if o not in owners)
    if rec["owners_without_site"]:  # say why: the owner could not be traced, or its addition is no site
        _, failures = find_sites(model, size)
        reasons = {f.owner: f.reason.splitlines()[0][:200] for f in failures}
        if _other_forward_paths(model):
            reasons[""] = "in the root's own code: a gate there would act in forward() but not in forward_features()"
        rec["why_without_site"] = {
            o: reasons.get(o, "its addition is no residual unit by retrofit's rules (a sum of two computed terms, "
                           "or nested in another unit's branch)")
            for o in rec["owners_without_site"]
        }

    try:
        rec["eval_diff"] = max_difference(reference, _forward(model, x))
        if reference_train is not None:
            _restore(buffers)
            rec["train_diff"] = max_difference(reference_train, _forward(model, x, train=True))
            _restore(buffers)
    except Exception as e:
        return done("fail", "retrofitted-forward-error", _first_line(e))
    if rec["eval_diff"] > RTOL or rec.get("train_diff", 0.0) > RTOL:
        return done("fail", "wrong-output", f"outputs differ: eval {rec['eval_diff']:.3g}, train {rec.get('train_diff')}")

    try:
        rec["pickle_diff"], rec["pickle_gates_called"] = pickle_round_trip(model, x, reference)
    except Exception as e:
        return done("fail", "pickle-error", _first_line(e))
    if rec["pickle_diff"] > RTOL or rec["pickle_gates_called"] != rec["sites"]:
        return done("fail", "wrong-pickle", f"unpickled model called {rec['pickle_gates_called']} of "
                    f"{rec['sites']} gates; outputs differ by {rec['pickle_diff']:.3g}")

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "model.safetensors"
        try:
            save_checkpoint(model, path)
            del model
            gc.collect()
            loaded = load_checkpoint(path)
            rec["reload_diff"] = max_difference(reference, _forward(loaded, x))
        except Exception as e:
            return done("fail", "checkpoint-error", _first_line(e))
    if rec["reload_diff"] > RTOL:
        return done("fail", "wrong-reload", f"reloaded outputs differ by {rec['reload_diff']:.3g}")
    return done("pass", "partial" if rec["owners_without_site"] else "all-sites")


def pickle_round_trip(model: Any, x: Any, reference: Any) -> tuple[float, int]:
    """``pickle.loads(pickle.dumps(model))`` run on ``x``: ``(max_difference to reference, gates called)``.

    Pickle is what ``torch.save(model)`` and spawn-based multiprocessing use; a rewritten owner
    whose forward did not survive it would compute the original network, so the gates a forward
    of the copy calls are counted (every inserted one must be).
    """
    from retrofit.blocks import ChannelGate

    pickled = pickle.loads(pickle.dumps(model))
    called = []
    for gate in (m for m in pickled.modules() if isinstance(m, ChannelGate)):
        gate.register_forward_hook(lambda *_: called.append(1))
    return max_difference(reference, _forward(pickled, x)), len(called)


# --------------------------------------------------------------------------- detection, segmentation

DENSE_ZOO = "torchvision-dense"
DENSE_RESULTS = ROOT / "benchmarks" / "results" / "coverage_dense.jsonl"
#: Side of the square probe images. Segmenters run at it; detectors resize every image to their
#: ``min_size`` first (800 px for the R-CNNs, 320 for the 320 variants, 300 for SSD300).
DENSE_SIDE = 64
DENSE_BUDGET = 1800.0


def list_dense_models() -> list[tuple[str, str]]:
    """``("torchvision", name)`` of every torchvision detection and segmentation builder."""
    import torchvision

    models = torchvision.models
    names = models.list_models(module=models.detection) + models.list_models(module=models.segmentation)
    return [("torchvision", n) for n in names]


def dense_task(name: str) -> str:
    """``"segmentation"`` or ``"detection"``: the torchvision module that defines builder ``name``."""
    import torchvision

    module = torchvision.models.get_model_builder(name).__module__
    return "segmentation" if module.startswith("torchvision.models.segmentation") else "detection"


def dense_kwargs(name: str) -> dict[str, Any]:
    """Builder kwargs that make a random-init model's outputs worth comparing.

    Detectors keep every box (``box_score_thresh=0.0`` for the R-CNNs, ``score_thresh=0.0`` for
    RetinaNet, FCOS, SSD): at their default thresholds a random-init detector may return no box,
    and an empty output equals anything. Segmenters that have one get ``aux_loss=True`` (the
    architecture of their COCO weights), so the auxiliary head's map is compared too.
    """
    import inspect

    import torch
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    if dense_task(name) == "segmentation":
        return {"aux_loss": True} if "aux_loss" in inspect.signature(builder).parameters else {}
    with torch.device("meta"):
        cls = type(builder(weights=None, weights_backbone=None))
    return {"box_score_thresh" if "box_score_thresh" in inspect.signature(cls).parameters else "score_thresh": 0.0}


def model_part(owner: str) -> str:
    """Where a site of a torchvision detector or segmenter sits: ``backbone`` (``backbone.body`` of a
    detector, ``backbone`` of a segmenter, SSD's feature extractor), ``FPN`` (``backbone.fpn``) or
    ``heads`` (RPN, RoI heads, detection and segmentation heads)."""
    if owner.startswith("backbone.fpn"):
        return "FPN"
    return "backbone" if owner == "backbone" or owner.startswith("backbone.") else "heads"


def check_dense_model(name: str, workdir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Retrofit one torchvision detection or segmentation model and check that it stays the same.

    Random init through ``retrofit.load_model("torchvision:NAME", pretrained=False, **kwargs)``
    (kwargs from :func:`dense_kwargs`), seed 0, eval mode; probe: :data:`PROBE_BATCH` random
    ``3 × 64 × 64`` images (a list for detectors, :func:`retrofit.probe.probe_input`). Then
    ``add_attention(model, "eca")`` (identity init), and the outputs — every tensor of a
    detector's per-image dicts (boxes, labels, scores, masks, keypoints), a segmenter's ``out`` and
    ``aux`` maps — compared with the original's after insertion, after a pickle round trip and
    after ``save_checkpoint`` → ``load_checkpoint``.

    Keys: ``zoo``, ``name``, ``family``, ``task`` (``detection``/``segmentation``), ``params``,
    ``kwargs``, ``input_size``, ``resized_to`` (a detector's ``min_size``), ``outputs`` (the keys of
    its output dict, per image for detectors), ``detections`` (boxes the original returns over the
    probe images), ``untraced`` and ``backbone_census`` (for ``no-site``: owners fx could not trace,
    and :func:`addition_census` of ``model.backbone`` at the size it sees — a backbone with residual
    additions makes the refusal a ``fail``), ``sites``, ``sites_by_part`` (see
    :func:`model_part`), ``head_sites`` (owners outside the backbone), ``eval_diff``,
    ``pickle_diff``, ``pickle_gates_called``, ``reload_diff`` (:func:`max_difference`: 0.0 is
    bit-equal), ``status`` (``pass``/``no-site``/``fail``/``skip``), ``kind``, ``reason``, ``seconds``.
    """
    import torch

    from retrofit import RetrofitError, add_attention, load_checkpoint, load_model, save_checkpoint
    from retrofit.graph import find_sites
    from retrofit.probe import probe_input, takes_image_list

    start = time.perf_counter()
    rec: dict[str, Any] = {"zoo": "torchvision", "name": name, "family": family_of("torchvision", name),
                           "task": dense_task(name)}

    def done(status: str, kind: str, reason: str = "") -> dict[str, Any]:
        rec.update(status=status, kind=kind, reason=reason, seconds=round(time.perf_counter() - start, 2))
        return rec

    rec["params"] = count_params("torchvision", name)
    rec["kwargs"] = kwargs = dense_kwargs(name)
    size = (3, DENSE_SIDE, DENSE_SIDE)
    rec["input_size"] = list(size)
    torch.manual_seed(0)
    try:
        model = load_model(f"torchvision:{name}", pretrained=False, **kwargs)[0]
        x = probe_input(model, size)
        reference = _forward(model, x)
    except Exception as e:
        return done("skip", "original-fails", _first_line(e))
    rec["outputs"] = list(reference[0] if takes_image_list(model) else reference)
    if takes_image_list(model):
        rec["resized_to"] = int(model.transform.min_size[-1])
        rec["detections"] = sum(len(image["boxes"]) for image in reference)

    try:
        model, inserted = add_attention(model, "eca", input_size=size)
    except RetrofitError as e:
        if not str(e).startswith("no residual site"):
            return done("fail", "refused", str(e))
        rec["untraced"] = [f.owner or "<root>" for f in find_sites(model, size)[1]]
        side = rec.get("resized_to", DENSE_SIDE)  # the backbone sees the resized batch
        rec["backbone_census"] = addition_census(model.backbone, _example((3, side, side)))
        if rec["backbone_census"]["residual"]:
            return done("fail", "refused", str(e))
        return done("no-site", "no-site", str(e))
    except Exception as e:
        return done("fail", "engine-error", _first_line(e))
    rec["sites"] = len(inserted)
    rec["sites_by_part"] = dict(Counter(model_part(s.owner) for s in inserted))
    rec["head_sites"] = [s.owner for s in inserted if model_part(s.owner) != "backbone"]

    try:
        rec["eval_diff"] = max_difference(reference, _forward(model, x))
    except Exception as e:
        return done("fail", "retrofitted-forward-error", _first_line(e))
    try:
        rec["pickle_diff"], rec["pickle_gates_called"] = pickle_round_trip(model, x, reference)
    except Exception as e:
        return done("fail", "pickle-error", _first_line(e))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        try:
            save_checkpoint(model, Path(tmp) / "model.safetensors")
            rec["reload_diff"] = max_difference(reference, _forward(load_checkpoint(Path(tmp) / "model.safetensors"), x))
        except Exception as e:
            return done("fail", "checkpoint-error", _first_line(e))
    if max(rec["eval_diff"], rec["pickle_diff"], rec["reload_diff"]) > RTOL or rec["pickle_gates_called"] != rec["sites"]:
        return done("fail", "wrong-output", f"outputs differ: eval {rec['eval_diff']:.3g}, pickle "
                    f"{rec['pickle_diff']:.3g} ({rec['pickle_gates_called']} of {rec['sites']} gates called), "
                    f"reload {rec['reload_diff']:.3g}")
    return done("pass", "all-equal")


# --------------------------------------------------------------------------- sweep driver


def read_results(path: Path = RESULTS) -> list[dict[str, Any]]:
    """Records of a results file; a later record for the same model replaces an earlier one."""
    if not path.exists():
        return []
    by_model: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_model[(rec["zoo"], rec["name"])] = rec
    return list(by_model.values())


def _append(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()


def worker(todo: Path, results: Path, progress: Path, memory_gb: float, dense: bool = False) -> None:
    """Check each ``zoo name`` line of ``todo`` in turn (:func:`check_dense_model` when ``dense``,
    else :func:`check_model`), announcing each model in ``progress``."""
    import resource
    import warnings

    import torch

    if memory_gb:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for line in todo.read_text().splitlines()[:MODELS_PER_WORKER]:
        zoo, name = line.split()
        progress.write_text(json.dumps({"zoo": zoo, "name": name, "start": time.time()}))
        try:
            rec = check_dense_model(name) if dense else check_model(zoo, name)
        except MemoryError:
            rec = {"zoo": zoo, "name": name, "family": family_of(zoo, name), "status": "skip", "kind": "memory",
                   "reason": f"over the sweep's {memory_gb:g} GiB memory limit"}
        except Exception as e:  # a bug in the sweep itself: record it, keep going
            rec = {"zoo": zoo, "name": name, "family": family_of(zoo, name), "status": "fail",
                   "kind": "sweep-error", "reason": _first_line(e)}
        if any(text in rec.get("reason", "") for text in _OUT_OF_MEMORY):
            rec.update(status="skip", kind="memory", reason=f"over the sweep's {memory_gb:g} GiB memory limit")
        _append(results, rec)
        gc.collect()


def sweep(
    models: list[tuple[str, str]], results: Path, budget: float, memory_gb: float, redo: bool, dense: bool = False
) -> None:
    """Check ``models`` in a restartable worker (see :func:`worker`); append one record per model to ``results``."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        todo_file, progress = Path(tmp) / "todo.txt", Path(tmp) / "progress.json"
        remaining = list(models)
        if not redo:
            done = {(r["zoo"], r["name"]) for r in read_results(results)}
            remaining = [m for m in remaining if m not in done]
        while remaining:
            todo_file.write_text("".join(f"{z} {n}\n" for z, n in remaining))
            progress.unlink(missing_ok=True)
            before = len(results.read_text().splitlines()) if results.exists() else 0
            proc = subprocess.Popen(
                [sys.executable, __file__, "_worker", str(todo_file), str(results), str(progress), str(memory_gb)]
                + (["--dense"] if dense else [])
            )
            killed = None
            while proc.poll() is None:
                time.sleep(1.0)
                try:
                    current = json.loads(progress.read_text())
                except (OSError, ValueError):
                    continue
                if time.time() - current["start"] > budget:
                    proc.kill()
                    proc.wait()
                    killed = current
            written = len(results.read_text().splitlines()) if results.exists() else 0
            remaining = remaining[written - before:]
            if not remaining or (killed is None and proc.returncode == 0):
                continue  # done, or the worker retired after its share: start a fresh one
            zoo, name = remaining.pop(0)  # the model the worker was on when it stopped
            if killed is not None:
                kind, reason = "timeout", f"over the sweep's {budget:g} s budget per model"
            else:
                kind, reason = "crash", f"the worker process died (exit code {proc.returncode})"
            _append(results, {"zoo": zoo, "name": name, "family": family_of(zoo, name), "status": "skip",
                              "kind": kind, "reason": reason, "seconds": budget if killed else None})
            print(f"{zoo} {name}: {kind}", file=sys.stderr)
    # one line per model (a redone model's later record replaces its earlier one)
    results.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in read_results(results)))


# --------------------------------------------------------------------------- report

_STATUS_ORDER = ("pass", "fail", "no-site", "skip")


def _versions() -> str:
    import timm
    import torch
    import torchvision

    return f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}"


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per zoo and status, and the pass rate over architectures with residual additions.

    An architecture *has residual additions* when it passes or fails (a failure is counted
    against retrofit whatever its cause); ``no-site`` models (census: no 4-D additions) and
    skipped ones are outside the rate.
    """
    by_zoo: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_zoo[r["zoo"]][r["status"]] += 1
        by_zoo["both"][r["status"]] += 1
    residual = by_zoo["both"]["pass"] + by_zoo["both"]["fail"]
    rate = by_zoo["both"]["pass"] / residual if residual else 0.0
    return {"by_zoo": by_zoo, "residual": residual, "rate": rate}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _outcome(r: dict[str, Any]) -> str:
    if r["status"] == "pass":
        note = f"; {len(r['owners_without_site'])} residual module(s) without site" if r["owners_without_site"] else ""
        return f"pass ({r['sites']} sites{note})"
    return f"{r['status']}: {r['kind']}"


def _partial_note(records: list[dict[str, Any]], everything: list[tuple[str, str]]) -> list[str]:
    """A warning block when the records cover only part of the zoos' architectures."""
    done = {(r["zoo"], r["name"]) for r in records}
    missing = [m for m in everything if m not in done]
    if not missing:
        return []
    def count(zoo: str, pool: Any) -> int:
        return sum(1 for z, _ in pool if z == zoo)
    checked = len(everything) - len(missing)
    unchecked = sorted({family_of(z, n) for z, n in missing} - {r["family"] for r in records})
    families = (f"{len(unchecked)} families have no checked model yet: {', '.join(unchecked[:10])}"
                + (", …" if len(unchecked) > 10 else "") if unchecked else
                "every family has at least one checked model, so the missing ones are variants of checked families")
    return [
        f"> **Partial sweep.** These records cover {checked:,} of the {len(everything):,} architectures "
        f"({count('timm', everything):,} timm + {count('torchvision', everything):,} torchvision); not yet checked: "
        f"{count('timm', missing):,} timm and {count('torchvision', missing):,} torchvision models; {families}. Resume with "
        "`python benchmarks/coverage.py run` (records already present are kept), then regenerate this page with "
        "`python benchmarks/coverage.py report`.",
        "",
    ]


def render(
    records: list[dict[str, Any]],
    everything: list[tuple[str, str]] | None = None,
    dense: list[dict[str, Any]] | None = None,
) -> str:
    """docs/coverage.md from the sweep records (``everything``: the zoos' architectures, for the
    partial note; ``dense``: :func:`check_dense_model` records, for their own section)."""
    records = sorted(records, key=lambda r: (r["zoo"] != "torchvision", r["family"], r["name"]))
    s = summarize(records)
    lines = [
        "# Coverage of the zoos",
        "",
        *_partial_note(records, everything or []),
        "Generated by `python benchmarks/coverage.py report` from `benchmarks/results/coverage.jsonl`, which",
        "`python benchmarks/coverage.py run` writes (every `timm.list_models()` architecture and every",
        f"torchvision classification model; {_versions()}; CPU, one thread). Do not edit by hand.",
        "",
        "Each architecture is built with random weights, run in eval mode on the smallest input it accepts",
        "(64×64 first, then 96, 128, then its default size), retrofitted with `add_attention(model, \"eca\")`",
        "(identity init), and checked: eval and train-mode outputs equal the original's (max |Δ| ≤ 1e-5 ·",
        "max(1, max|y|); train mode with the same RNG seed), `pickle.loads(pickle.dumps(model))` calls every",
        "gate and gives the same outputs, and a `save_checkpoint` → `load_checkpoint` round trip gives the same",
        "eval outputs again. An **addition census** of the original forward (every addition of two same-shape",
        "activations, attributed to the module whose own code performs it, including modules fx cannot",
        "trace) tells whether a model without sites really has no residual feature-map additions, and which",
        "layout its residuals have: `(N, C, H, W)` maps (in a module whose input is such a map); channels-last",
        "`(N, H, W, C)` maps (N the batch, H×W the input's grid over one stride, in a module whose input is",
        "such a map, and on such a grid at every stage its class runs); other 4-D tensors (attention logits",
        "and rotary embeddings `(N, heads, L, ·)`, windows, NesT's `(N, blocks, tokens, C)`, convolutional",
        "position encodings inside token modules); 2-D/3-D tokens.",
        "",
        "Outcomes:",
        "",
        "* **pass** — sites found, outputs unchanged, checkpoint round trip exact. *partial* marks a model",
        "  in which some module adds two same-shape `(N, C, H, W)` activations but got no site; the",
        "  per-model table says why (a module called twice per forward, one fx cannot trace, an addition",
        "  that is no residual unit, e.g. a merge of two resolutions, or one in the root model's own code:",
        "  HRNet's `incre_modules` sum, which a gate in `forward()` would miss on `forward_features()`, so",
        "  it is not offered).",
        "* **no-site** — retrofit reports *no residual site* and the census agrees: no residual",
        "  `(N, C, H, W)` additions. *channels-last*: residuals on channels-last `(N, H, W, C)` maps — Swin,",
        "  VOLO, MambaOut, Sequencer, SAM's ViT, Hiera-Det blocks; *tokens-only*: residuals on tokens —",
        "  3-D `(N, L, C)`, or grouped in 4-D by head, window or block — transformers. Neither is a",
        "  **site**: channel attention is defined on `(N, C, H, W)` maps. *no-additions*: no residual",
        "  connections at all (VGG, DenseNet, …). *other-additions*: only additions of parameters, buffers",
        "  or broadcasts.",
        "* **fail** — a clear error (named below), never a silently wrong model.",
        "* **skip** — not judged: too large for the sweep machine (over 1 B parameters), over the time",
        "  budget, or the original model itself does not run with random weights.",
        "",
        "Input: models whose position embeddings fix the input size (`fixed_input_size` in timm's config,",
        "or that fail below their default size) are built with `img_size=64` (else 128) — the same",
        "architecture with a smaller embedding table; the kwarg is recorded in the checkpoint's recipe",
        "and the reload rebuilds it. The *input* column shows it.",
        "",
        "## Summary",
        "",
        "| zoo | tried | pass | fail | no-site | skip |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for zoo in ("torchvision", "timm", "both"):
        c = s["by_zoo"].get(zoo, Counter())
        lines.append(f"| {zoo} | {sum(c.values())} | {c['pass']} | {c['fail']} | {c['no-site']} | {c['skip']} |")
    kinds = Counter((r["status"], r["kind"]) for r in records)
    lines += [
        "",
        f"**{s['by_zoo']['both']['pass']} of {s['residual']} architectures with residual additions pass: "
        f"{100 * s['rate']:.1f}%** (the denominator is pass + fail; no-site and skipped models are outside it).",
        "",
        "| outcome | kind | models |",
        "|---|---|---:|",
    ]
    for (status, kind), n in sorted(kinds.items(), key=lambda kv: (_STATUS_ORDER.index(kv[0][0]), -kv[1])):
        lines.append(f"| {status} | {kind} | {n} |")

    failures = [r for r in records if r["status"] == "fail"]
    lines += ["", "## Failures", ""]
    if failures:
        lines += ["| model | family | kind | reason |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['family']} | {r['kind']} | {_cell(r['reason'])} |" for r in failures]
    else:
        lines.append("None.")
    skipped = [r for r in records if r["status"] == "skip"]
    lines += ["", "## Skipped", ""]
    if skipped:
        lines += ["| model | family | kind | reason |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['family']} | {r['kind']} | {_cell(r['reason'])} |" for r in skipped]
    else:
        lines.append("None.")

    if dense:
        lines += ["", *render_dense(dense)]
    families: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        families[r["family"]].append(r)
    lines += [
        "",
        "## Per family",
        "",
        "Families are the defining source module (timm `timm/models/<family>.py`, torchvision `tv.<module>`).",
        "",
        "| family | models | pass | fail | no-site | skip | sites per model | no-site kinds |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for fam, rs in families.items():
        c = Counter(r["status"] for r in rs)
        sites = [r["sites"] for r in rs if r["status"] == "pass"]
        span = "" if not sites else str(min(sites)) if min(sites) == max(sites) else f"{min(sites)}–{max(sites)}"
        ns = Counter(r["kind"] for r in rs if r["status"] == "no-site")
        lines.append(
            f"| {fam} | {len(rs)} | {c['pass']} | {c['fail']} | {c['no-site']} | {c['skip']} | {span} | "
            f"{', '.join(f'{k} {n}' for k, n in ns.most_common())} |"
        )
    lines += ["", "## Per model", ""]
    for fam, rs in families.items():
        c = Counter(r["status"] for r in rs)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(c.items(), key=lambda kv: _STATUS_ORDER.index(kv[0])))
        lines += [f"<details><summary><b>{fam}</b> — {summary}</summary>", "",
                  "| model | input | outcome | reason |", "|---|---|---|---|"]
        for r in rs:
            size = "×".join(map(str, r["input_size"][1:])) if r.get("input_size") else ""
            size += "".join(f" ({k}={v})" for k, v in (r.get("kwargs") or {}).items())
            reason = r.get("reason", "") if r["status"] != "pass" else "; ".join(
                f"{owner}: {why}" for owner, why in list((r.get("why_without_site") or {}).items())[:2]
            )
            lines.append(f"| {r['name']} | {size} | {_outcome(r)} | {_cell(reason)} |")
        lines += ["", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def _same(diff: float | None) -> str:
    return "—" if diff is None else "equal" if diff == 0.0 else f"Δ {diff:.3g}"


def render_dense(records: list[dict[str, Any]]) -> list[str]:
    """The detection and segmentation section of docs/coverage.md (records of :func:`check_dense_model`)."""
    lines = [
        "## torchvision detection and segmentation",
        "",
        f"Generated from `benchmarks/results/{DENSE_RESULTS.name}`, which `python benchmarks/coverage.py run",
        f"--zoo {DENSE_ZOO}` writes: every builder of `torchvision.models.detection` and",
        "`torchvision.models.segmentation`, built by `retrofit.load_model(\"torchvision:NAME\", pretrained=False,",
        "...)` (random init, seed 0, no download), probed with two random 64×64 images — a list for detectors,",
        "which resize them to their `min_size` (the *input* column) — and retrofitted with",
        "`add_attention(model, \"eca\")` (identity init). *where*: `backbone` (`backbone.body` of a detector), `FPN`",
        "(`backbone.fpn`) or heads (named).",
        "Detectors are built with `box_score_thresh=0.0` (R-CNNs) or `score_thresh=0.0` (RetinaNet, FCOS, SSD) so",
        "that random weights still return boxes (*boxes*: over both images); segmenters with `aux_loss=True`",
        "where they have an auxiliary head. *identity init*, *pickle* and *save/load* compare every output",
        "tensor (boxes, labels, scores, masks, keypoints; `out` and `aux`) with the original model's: *equal* is",
        "bit-equal. *pickle*: `pickle.loads(pickle.dumps(model))`, with the gates its forward calls.",
        "*save/load*: `save_checkpoint` (which rebuilds the model and verifies it) → `load_checkpoint`.",
        f"*seconds*: the whole check, on one CPU thread of a shared machine (budget {DENSE_BUDGET:g} s; a",
        "detector's forward at 800 px dominates) — not a speed benchmark.",
        "",
        "| model | task | input | sites | where | boxes | identity init | pickle | save/load | seconds |",
        "|---|---|---|---:|---|---:|---|---|---|---:|",
    ]
    for r in sorted(records, key=lambda r: (r.get("task", dense_task(r["name"])), r["name"])):
        size = f"{r['input_size'][1]}×{r['input_size'][2]}" if r.get("input_size") else ""
        if r.get("resized_to"):
            size += f" → {r['resized_to']}"
        seconds = f"{r['seconds']:.0f}" if r.get("seconds") is not None else ""
        task = r.get("task") or dense_task(r["name"])
        if "sites" not in r:
            reason = r.get("reason", "").split(";")[0]
            if r.get("backbone_census") is not None and not r["backbone_census"]["residual"]:
                reason += "; the backbone's census has no residual addition"
            if r.get("untraced"):
                reason += f" (untraced: `{'`, `'.join(r['untraced'])}`)"
            lines.append(f"| {r['name']} | {task} | {size} | — | {r['status']}: {_cell(reason)} | "
                         f"{r.get('detections', '')} | | | | {seconds} |")
            continue
        parts = ", ".join(f"{part} {n}" for part, n in sorted(r["sites_by_part"].items()))
        if r["head_sites"]:
            parts += f" (`{'`, `'.join(r['head_sites'])}`)"
        pickled = f"{_same(r.get('pickle_diff'))}, {r['pickle_gates_called']}/{r['sites']} gates" \
            if "pickle_gates_called" in r else "—"
        verdict = "" if r["status"] == "pass" else f" — {r['status']}: {_cell(r.get('reason', ''))}"
        lines.append(
            f"| {r['name']} | {task} | {size} | {r['sites']} | {parts} | {r.get('detections', '')} | "
            f"{_same(r.get('eval_diff'))} | {pickled} | {_same(r.get('reload_diff'))}{verdict} | {seconds} |"
        )
    return lines


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="check models, appending to the results file")
    run.add_argument(
        "--zoo", choices=("all", "timm", "torchvision", DENSE_ZOO), default="all",
        help=f"classification models, or {DENSE_ZOO}: torchvision's detection and segmentation models",
    )
    run.add_argument("--models", help="comma-separated names (default: every model of --zoo)")
    run.add_argument("--results", type=Path, help=f"default {RESULTS.name}, for {DENSE_ZOO} {DENSE_RESULTS.name}")
    run.add_argument(
        "--budget", type=float, help=f"seconds per model before it is skipped (default 300, {DENSE_ZOO} {DENSE_BUDGET:g})"
    )
    run.add_argument("--memory-gb", type=float, default=14.0, help="address-space limit of the worker")
    run.add_argument("--redo", action="store_true", help="check models that already have a record again")
    run.add_argument(
        "--families-first", action="store_true", help="one model of every family first, then the rest"
    )
    report = sub.add_parser("report", help="write docs/coverage.md from the results file")
    report.add_argument("--results", type=Path, default=RESULTS)
    report.add_argument("--dense-results", type=Path, default=DENSE_RESULTS)
    report.add_argument("--out", type=Path, default=DOC)
    w = sub.add_parser("_worker")
    for arg in ("todo", "results", "progress"):
        w.add_argument(arg, type=Path)
    w.add_argument("memory_gb", type=float)
    w.add_argument("--dense", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "_worker":
        worker(args.todo, args.results, args.progress, args.memory_gb, args.dense)
    elif args.command == "run":
        dense = args.zoo == DENSE_ZOO
        models = list_dense_models() if dense else list_architectures(args.zoo)
        if args.models:
            wanted = set(args.models.split(","))
            models = [m for m in models if m[1] in wanted]
        if args.families_first:
            models = families_first(models)
        results = args.results or (DENSE_RESULTS if dense else RESULTS)
        budget = args.budget or (DENSE_BUDGET if dense else 300.0)
        sweep(models, results, budget, args.memory_gb, args.redo, dense)
    else:
        records, dense = read_results(args.results), read_results(args.dense_results)
        args.out.write_text(render(records, list_architectures("all"), dense))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
