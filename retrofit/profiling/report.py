"""What ``retrofit report params-flops TARGET`` reports: a model, or a checkpoint beside its base architecture."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from torch import nn

from ..checkpoint import is_checkpoint, load_target, read_recipe
from ..models import ModelSpec, build, load_model, parse_name, pretrained_architecture_kwargs
from .profile import Profile, profile
from .latency import measure_latencies
from .probe import check_size


#: Keys of :meth:`TargetReport.to_dict` ``delta`` / ``delta_percent`` (stable; see docs/profile.md).
DELTA_KEYS = ("params", "trainable_params", "macs", "flops", "fvcore_macs", "element_ops", "latency_ms")


@dataclass(frozen=True)
class TargetReport:
    """The profile of a CLI target: a model name, or a checkpoint compared with its base model.

    Attributes:
        target: as given (model name or ``.safetensors`` path).
        kind: ``"model"`` or ``"checkpoint"``.
        name: the architecture's name (a checkpoint's source model).
        model: profile of the target (the retrofitted model for a checkpoint).
        base: profile of the checkpoint's base architecture, without blocks; ``None`` for a model.
    """

    target: str
    kind: str
    name: str
    model: Profile
    base: Profile | None = None

    def delta(self) -> dict[str, float | int | None] | None:
        """Retrofitted − base for :data:`DELTA_KEYS` (``latency_ms`` is ``None`` unless timed)."""
        if self.base is None:
            return None
        return {k: _sub(_metric(self.model, k), _metric(self.base, k)) for k in DELTA_KEYS}

    def delta_percent(self) -> dict[str, float | None] | None:
        """100 × Δ / base for :data:`DELTA_KEYS` (``None`` where the base is 0 or not measured)."""
        delta = self.delta()
        if delta is None:
            return None
        out: dict[str, float | None] = {}
        for k, d in delta.items():
            b = _metric(self.base, k)  # type: ignore[arg-type]
            out[k] = None if d is None or not b else 100.0 * d / b
        return out

    def latency_delta_measured(self) -> bool | None:
        """Whether the latency Δ of medians is larger than the run-to-run spread of both timings.

        ``False``: the Δ lies inside the larger :attr:`Latency.spread_ms` (interquartile range), so
        no difference was measured. ``None`` when there is no base or no timing.
        """
        if self.base is None or self.base.latency is None or self.model.latency is None:
            return None
        spread = max(self.model.latency.spread_ms, self.base.latency.spread_ms)
        return abs(self.model.latency.median_ms - self.base.latency.median_ms) > spread

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document (schema ``retrofit.params-flops/1``)."""
        return {
            "schema": "retrofit.params-flops/1",
            "target": self.target,
            "kind": self.kind,
            "name": self.name,
            "input_size": list(self.model.input_size),
            "batch_size": self.model.batch_size,
            "model": self.model.to_dict(),
            "base": self.base.to_dict() if self.base else None,
            "delta": self.delta(),
            "delta_percent": self.delta_percent(),
            "latency_delta_measured": self.latency_delta_measured(),
            "uncounted_ops": self.uncounted_ops(),
        }

    def uncounted_ops(self) -> dict[str, int]:
        """Ops that ran without a counting rule in the target or its base: name → calls (in no total)."""
        base = self.base.uncounted_ops if self.base else {}
        return dict(sorted({**base, **self.model.uncounted_ops}.items()))


def _metric(p: Profile, key: str) -> float | int | None:
    if key == "latency_ms":
        return p.latency.median_ms if p.latency else None
    return getattr(p, key)


def _sub(a: float | int | None, b: float | int | None) -> float | int | None:
    return None if a is None or b is None else a - b


def profile_target(
    target: str,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    latency: bool = False,
    num_classes: int | None = None,
) -> TargetReport:
    """Profile a model name, or a retrofit checkpoint together with its base architecture.

    Counts need the architecture, not its weights, so a model name is built without fetching
    any (:func:`architecture`): ``pretrained`` only picks the architecture of the zoo's
    pretrained model where the zoo changes it on loading (torchvision's GoogLeNet, Inception-v3
    and ViTs), and a ``weights`` file is loaded strictly, so it must fit the architecture and
    never changes a count. A checkpoint (``*.safetensors``) is loaded with
    :func:`retrofit.load_checkpoint` (its own file); its base is the recipe's source architecture
    built without blocks and without weights. ``num_classes`` sizes a model name's classifier
    (a checkpoint has its own). ``input_size`` ``None``: ``(3, 224, 224)``, or for
    a checkpoint written by ``retrofit finetune`` the input size it was trained at (its recorded
    data config).

    Raises:
        RetrofitError: unknown name, unreadable checkpoint or weights file, bad size.
    """
    size = check_size(input_size, batch_size) if input_size is not None else None  # before any loading
    checkpoint = is_checkpoint(target)
    if checkpoint:
        model = load_target(target, weights=weights, num_classes=num_classes)
    else:
        model = architecture(target, pretrained, weights, num_classes)
    if size is None:
        trained = (getattr(model, "retrofit_data_config", None) or {}).get("input_size")
        size = check_size(tuple(int(v) for v in trained) if trained else (3, 224, 224), batch_size)
    if not checkpoint:
        return TargetReport(str(target), "model", str(target), profile(model, size, batch_size, latency=latency))
    source = read_recipe(target).source
    base_model = build(ModelSpec(source["model"], source["zoo"], dict(source.get("kwargs") or {}))).eval()
    base, retrofitted = profile(base_model, size, batch_size), profile(model, size, batch_size)
    if latency:
        timed = measure_latencies([base_model, model], size, batch_size)
        base = replace(base, latency=timed[0])
        retrofitted = replace(retrofitted, latency=timed[1])
    return TargetReport(str(target), "checkpoint", source["model"], retrofitted, base)


def architecture(name: str, pretrained: bool = True, weights: str | None = None,
                 num_classes: int | None = None) -> nn.Module:
    """The model ``name`` names, built without downloading anything (eval mode, CPU).

    With ``weights`` the local file is loaded (strictly, by :func:`retrofit.load_model`), so a
    file that does not fit is refused as everywhere else. Otherwise the architecture is built
    with random weights; with ``pretrained`` it is the architecture of the zoo's pretrained
    model (:func:`retrofit.models.pretrained_architecture_kwargs`).

    Raises:
        RetrofitError: unknown name, bad weights file, an ``hf-hub:`` name whose configuration
            is neither reachable nor cached.
    """
    head = {} if num_classes is None else {"num_classes": num_classes}
    if weights is not None:
        return load_model(name, weights=weights, **head)[0]
    kwargs = pretrained_architecture_kwargs(parse_name(name)) if pretrained else {}
    return load_model(name, pretrained=False, **kwargs, **head)[0]
