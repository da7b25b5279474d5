"""The model side of fine-tuning: source → model, head replacement, parameter groups, freezing.

Which parameters are *new* decides what trains while the backbone is frozen: every parameter of
an inserted :class:`~retrofit.blocks.ChannelGate` (the *blocks*) and of the classifier *head*.
Everything else is the *backbone*. The three groups get their own learning-rate factors
(:func:`param_groups`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..blocks import ChannelGate
from ..errors import RetrofitError
from ..models import SOURCE_MARK
from .config import FinetuneConfig


def load_source(config: FinetuneConfig) -> nn.Module:
    """The model to fine-tune: a checkpoint or a model name, with ``config.block`` inserted when set.

    Raises :class:`RetrofitError` (bad name, weights, checkpoint or insertion options).
    """
    from ..checkpoint import load_target
    from ..surgery import add_attention

    model = load_target(config.source, pretrained=config.pretrained, weights=config.weights)
    if config.block is not None:
        kernel = config.kernel_size
        if isinstance(kernel, list) and len(kernel) == 1:
            kernel = kernel[0]
        model, _ = add_attention(
            model,
            config.block,
            placement=config.placement,
            reduction=config.reduction,
            kernel_size=kernel,
            groups=config.groups,
            init=config.init,
            include=config.include,
            exclude=config.exclude,
            stages=config.stages,
            replace_existing=config.replace_existing,
        )
    return model


def head(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(qualified name, module)`` of the classifier: timm's ``get_classifier()``, else the last ``nn.Linear``.

    Raises :class:`RetrofitError` when the model has no linear classifier.
    """
    names = {id(m): n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        module = get()
        if isinstance(module, nn.Linear) and id(module) in names:
            return names[id(module)], module
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise RetrofitError(f"{type(model).__name__} has no linear classifier head to fine-tune")
    return linears[-1]


def num_classes(model: nn.Module) -> int:
    """Output classes of the head (its ``out_features``)."""
    return head(model)[1].out_features


def replace_head(model: nn.Module, classes: int, *, force: bool = False) -> bool:
    """Give ``model`` a fresh ``classes``-way head when its class count differs; True when replaced.

    ``force`` replaces it even at the same count: the caller knows the classes are other ones
    (a fine-tuned checkpoint whose recorded class names differ from the data's).

    timm models use ``reset_classifier(classes)``; others get a new ``nn.Linear`` (same input
    width and bias) in place of their last one. The source record's ``num_classes`` kwarg is
    updated, so :func:`retrofit.load_checkpoint` rebuilds the new head. The new head is
    PyTorch-default initialised (seeded by the caller).
    """
    name, old = head(model)
    if old.out_features == classes and not force:
        return False
    source = dict(getattr(model, SOURCE_MARK, None) or {})
    if source.get("zoo") == "timm" and hasattr(model, "reset_classifier"):
        model.reset_classifier(classes)
        _, new = head(model)
        new.to(old.weight.device, old.weight.dtype)
    else:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = nn.Linear(old.in_features, classes, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        setattr(parent, attr, new)
    if head(model)[1].out_features != classes:
        raise RetrofitError(f"could not replace the head of {type(model).__name__} with a {classes}-class one")
    if source:
        source["kwargs"] = {**dict(source.get("kwargs") or {}), "num_classes": classes}
        setattr(model, SOURCE_MARK, source)
        if source.get("zoo") == "torchvision":
            _resize_auxiliary_heads(model, source)
    return True


def _resize_auxiliary_heads(model: nn.Module, source: dict) -> None:
    """torchvision's auxiliary classifiers (GoogLeNet ``aux1``/``aux2``, Inception-v3 ``AuxLogits``) get
    the new class count too, so the model is what the builder makes for it (and its checkpoint reloads).

    Every ``nn.Linear`` whose width differs from the builder's at the new ``num_classes`` (built on
    the meta device) is replaced by a fresh one of that width.
    """
    import torch

    from ..models import ModelSpec, build

    with torch.device("meta"):
        reference = build(ModelSpec(source["model"], "torchvision", dict(source["kwargs"])))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        try:
            want = reference.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(want, nn.Linear) and want.out_features != module.out_features:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, nn.Linear(module.in_features, want.out_features, bias=module.bias is not None,
                                            device=module.weight.device, dtype=module.weight.dtype))


def new_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of inserted blocks (``ChannelGate``) and of the head."""
    prefixes = [n for n, m in model.named_modules() if isinstance(m, ChannelGate)]
    prefixes.append(head(model)[0])
    return {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)}


def gate_parameter_names(model: nn.Module) -> set[str]:
    prefixes = [n for n, m in model.named_modules() if isinstance(m, ChannelGate)]
    return {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)}


#: Parameter-group names of a run, in optimizer order.
GROUPS = ("backbone", "blocks", "head")


def parameter_group_names(model: nn.Module) -> dict[str, str]:
    """Each parameter's group: ``blocks`` (inside an inserted :class:`~retrofit.blocks.ChannelGate`),
    ``head`` (the classifier, :func:`head`) or ``backbone`` (everything else)."""
    gates = gate_parameter_names(model)
    new = new_parameter_names(model)
    return {n: "blocks" if n in gates else "head" if n in new else "backbone" for n, _ in model.named_parameters()}


def param_groups(model: nn.Module, *, weight_decay: float, head_lr_mult: float,
                 block_lr_mult: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: {backbone, blocks, head} × {decay, no decay}, empty ones dropped.

    No weight decay on 0-/1-D tensors (norm scales and shifts, biases) and on the inserted blocks:
    like norm scales they set per-channel gains, and decay would only pull an identity-init gate
    towards an input-independent one (timm's ``no_weight_decay`` lists follow the same idea).
    ``lr_scale`` (which timm's schedulers multiply into each group's lr) is 1 for the backbone,
    ``head_lr_mult`` for the head and ``block_lr_mult`` for the blocks. Each group carries
    ``group`` (its name in :data:`GROUPS`) and ``names`` (parameter names, in order, for
    name-keyed optimizer state).
    """
    which = parameter_group_names(model)
    scale = {"backbone": 1.0, "blocks": block_lr_mult, "head": head_lr_mult}
    buckets: dict[tuple[str, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        group = which[name]
        decay = p.ndim > 1 and group != "blocks"
        buckets.setdefault((group, decay), []).append((name, p))
    groups = []
    for group in GROUPS:
        for decay in (True, False):
            items = buckets.get((group, decay))
            if items:
                groups.append({
                    "params": [p for _, p in items],
                    "names": [n for n, _ in items],
                    "group": group,
                    "weight_decay": weight_decay if decay else 0.0,
                    "lr_scale": scale[group],
                })
    return groups


def check_block_settings(model: nn.Module, config: FinetuneConfig) -> None:
    """Refuse (one line) block-only settings asked for on a model without inserted blocks: they would
    match no parameter. Raises :class:`RetrofitError`."""
    given = config.block_settings_given()
    if given and not gate_parameter_names(model):
        raise RetrofitError(f"{given[0]} applies to inserted blocks, and {describe_source(config)} has none with "
                            "parameters; add --block eca (or se), or leave it out")


def set_backbone_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (``requires_grad=False``) or unfreeze every parameter that is not new."""
    new = new_parameter_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or name in new)


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every BatchNorm in eval mode: it normalises with, and no longer updates, its running stats.

    Call after ``model.train()``; the next ``train()`` call undoes it.
    """
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def describe_source(config: FinetuneConfig) -> str:
    """Short text of what is being fine-tuned, for the start line."""
    what = Path(config.source).name if config.source.endswith(".safetensors") else config.source
    if config.block:
        what += f" + {config.block} ({config.placement}, {config.init} init)"
    return what


def freeze_gates(model: nn.Module) -> None:
    """``--train head``: the inserted blocks keep their weights (``requires_grad=False``); the head alone trains."""
    for name in gate_parameter_names(model):
        model.get_parameter(name).requires_grad_(False)
