"""Prove a recipe before it is written: rebuild the model from it and compare.

A checkpoint stores tensors and a recipe; :func:`retrofit.load_checkpoint` builds the
architecture from the recipe and loads the tensors. Whatever the recipe fails to record (a
``global_pool="max"``, a drop-path rate, an ``in_chans``) would reload as a *different* model
with no error. So before a recipe is first written, :func:`check_rebuild` builds the model
from it, loads the model's own tensors, and requires

* the same state-dict keys and shapes,
* the same eval-mode outputs on a seeded probe (within 1e-5 of the output's scale), and
* the same training-time settings: every dropout / drop-path probability, by module path.

The check runs once per recipe (the result is remembered on the model), so fine-tuning, which
saves the same model every epoch, pays for it once. Its cost on resnet50 is in
docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from torch import nn

from .errors import RetrofitError
from .recipe import Recipe

#: Attribute on a model: digest of the last recipe :func:`check_rebuild` accepted for it.
VERIFIED_MARK = "_retrofit_verified_recipe"
#: Module attributes that only act in training: dropout ``p``, drop-path ``drop_prob``, ``drop_rate``…
_TRAINING_SETTING = re.compile(r"^(p|drop_prob|.*drop.*rate.*|.*dropout.*)$")


def _recipe_digest(recipe: Recipe) -> str:
    """What identifies the architecture: the recipe less ``extra`` (fine-tuning notes) and versions."""
    fields = {k: v for k, v in json.loads(recipe.to_json()).items() if k not in ("extra", "versions")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def training_settings(model: nn.Module) -> dict[str, float]:
    """``{"path.attr": value}`` of every dropout / drop-path probability in ``model``."""
    found = {}
    for path, module in model.named_modules():
        for attr, value in vars(module).items():
            if _TRAINING_SETTING.match(attr) and isinstance(value, (int, float)) and not isinstance(value, bool):
                found[f"{path}.{attr}" if path else attr] = float(value)
    return found


def _options_hint(source: dict[str, Any]) -> str:
    name = source.get("model", "NAME")
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (source.get("kwargs") or {}).items())
    return f"retrofit.load_model({name!r}{', ' + kwargs if kwargs else ''}, <the option>=…)"


def check_rebuild(model: nn.Module, recipe: Recipe) -> None:
    """Refuse a recipe that does not rebuild ``model`` exactly (see the module docstring).

    Args:
        model: the model about to be saved (any device, dtype, train or eval mode; its modes
            and buffers are left as they were).
        recipe: the recipe about to be written with it.

    Raises:
        RetrofitError: one line naming what differs (keys, outputs, or a training-time setting)
            and how to build the model so that it can be recorded.
    """
    from .checkpoint import rebuild
    from .probe import default_input_size, inspection_mode, probe_input, same_output
    from .weights import load_state_dict_strict

    digest = _recipe_digest(recipe)
    if getattr(model, VERIFIED_MARK, None) == digest:
        return
    arch = recipe.source.get("model")
    cannot = f"cannot save this {type(model).__name__} as {arch!r} faithfully"
    hint = f"build it with {_options_hint(recipe.source)} so the checkpoint can record it; nothing was written"
    try:
        rebuilt = rebuild(recipe)
        load_state_dict_strict(rebuilt, model.state_dict(), "the model")
    except RetrofitError as e:
        raise RetrofitError(f"{cannot}: the model rebuilt from its recipe differs ({e}); {hint}") from None
    ours, theirs = training_settings(model), training_settings(rebuilt)
    differ = [k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)]
    if differ:
        k = sorted(differ)[0]
        raise RetrofitError(
            f"{cannot}: {k} is {ours.get(k)} here and {theirs.get(k)} when rebuilt from the recipe "
            f"({len(differ)} setting(s) differ); {hint}"
        )
    param = next(model.parameters(), None)
    if param is not None:
        rebuilt = rebuilt.to(param.device, param.dtype if param.is_floating_point() else None)
    size = tuple(recipe.input_size) if recipe.input_size else default_input_size(model)
    with inspection_mode(model), inspection_mode(rebuilt):
        same = same_output(model(probe_input(model, size, batch=1)), rebuilt(probe_input(rebuilt, size, batch=1)))
    if not same:
        raise RetrofitError(
            f"{cannot}: the model rebuilt from its recipe computes other outputs (an option that changes the "
            f"forward, e.g. global_pool, is not recorded); {hint}"
        )
    setattr(model, VERIFIED_MARK, digest)

