"""``trainer_state.safetensors``: everything a resumed run needs, with no pickle anywhere.

Tensors (safetensors):

* ``model.<key>`` — the model's state dict at the end of the last completed epoch;
* ``ema.<key>`` — the EMA model's state dict (when EMA is on);
* ``optim.<param name>.<slot>`` — optimizer state (``exp_avg``, ``momentum_buffer``, ``step`` …),
  keyed by parameter *name*, so it survives a rebuild of the model;
* ``rng.<rank>.torch`` / ``rng.<rank>.cuda`` — each rank's torch CPU/CUDA generator states.

JSON (safetensors metadata ``retrofit.trainer_state``): format, completed epochs, optimizer
updates, optimizer hyper-parameters per group (with parameter names), scheduler state, each
rank's Python and NumPy RNG states, the best result so far, the per-epoch metrics history, the
training settings and the model's recipe (so the state alone rebuilds the run). The file is written atomically like every checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_write_bytes
from ..errors import RetrofitError

STATE_FILE = "trainer_state.safetensors"
FORMAT = "retrofit.trainer_state/1"
_META_KEY = "retrofit.trainer_state"


@dataclass
class TrainerState:
    """A loaded trainer state: tensors grouped by owner plus the JSON record."""

    epoch: int
    updates: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU and CUDA (tensors), Python and NumPy (JSON lists)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_to_named(optimizer: torch.optim.Optimizer, names: list[list[str]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into name-keyed tensors and JSON (hyper-parameters, scalar slots)."""
    sd = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    groups = []
    for group, group_names in zip(sd["param_groups"], names):
        for idx, name in zip(group["params"], group_names):
            index_to_name[idx] = name
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(group_names)})
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in sd["state"].items():
        name = index_to_name[idx]
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{slot}"] = value
            else:
                scalars.setdefault(name, {})[slot] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_named(record: dict[str, Any], tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Rebuild an index-keyed optimizer state dict for ``optimizer`` from the name-keyed record."""
    saved_groups = record["param_groups"]
    current = optimizer.param_groups
    if len(saved_groups) != len(current) or any(
        list(s["params"]) != list(c.get("names", [])) for s, c in zip(saved_groups, current)
    ):
        raise RetrofitError("the optimizer's parameters differ from the run being resumed (different model or settings)")
    by_name: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, slot = key[len("optim."):].rpartition(".")  # slot names (exp_avg, step …) have no dots
        by_name.setdefault(name, {})[slot] = value
    state: dict[int, dict[str, Any]] = {}
    groups = []
    idx = 0
    for saved in saved_groups:
        ids = []
        for name in saved["params"]:
            slots = {**by_name.get(name, {}), **record["scalars"].get(name, {})}
            if slots:
                state[idx] = slots
            ids.append(idx)
            idx += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def save_trainer_state(
    folder: str | os.PathLike,
    *,
    epoch: int,
    updates: int,
    model: torch.nn.Module,
    ema: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    scheduler_state: dict[str, Any],
    rng: list[dict[str, Any]],
    best: dict[str, Any],
    history: list[dict[str, Any]],
    config: dict[str, Any],
    recipe: str,
) -> Path:
    """Write ``folder/trainer_state.safetensors`` atomically (see the module docstring for its layout).

    ``rng`` holds one :func:`rng_state` per rank, rank 0 first; ``recipe`` is the model's recipe
    JSON (:class:`retrofit.recipe.Recipe`), enough to rebuild the architecture.
    """
    from safetensors.torch import save

    from ..checkpoint import _contiguous_unshared

    names = [list(g["names"]) for g in optimizer.param_groups]
    optim_tensors, optim_record = _optimizer_to_named(optimizer, names)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update(optim_tensors)
    rng_json = []
    for rank, r in enumerate(rng):
        tensors[f"rng.{rank}.torch"] = r["torch"]
        for i, c in enumerate(r["cuda"]):
            tensors[f"rng.{rank}.cuda.{i}"] = c
        rng_json.append({"python": r["python"], "numpy": r["numpy"], "cuda": len(r["cuda"])})
    record = {
        "format": FORMAT,
        "epoch": epoch,
        "updates": updates,
        "optimizer": optim_record,
        "scheduler": scheduler_state,
        "rng": rng_json,
        "best": best,
        "history": history,
        "config": config,
        "recipe": recipe,
    }
    from ..checkpoint import DIGEST_KEY, tensors_digest

    path = Path(folder) / STATE_FILE
    tensors, record_json = _contiguous_unshared(tensors), json.dumps(record)
    metadata = {_META_KEY: record_json, DIGEST_KEY: tensors_digest(tensors, record_json)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_trainer_state(folder: str | os.PathLike) -> TrainerState:
    """Read ``folder/trainer_state.safetensors``.

    Raises :class:`RetrofitError` when it is missing, damaged or of another format.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..checkpoint import DIGEST_KEY, tensors_digest

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise RetrofitError(f"nothing to resume: {path} not found (run without --resume to start)")
    start_over = "start over with --overwrite (or use another --output)"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        record_json = metadata[_META_KEY]
        record = json.loads(record_json)
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise RetrofitError(f"{path} is damaged ({type(e).__name__}); {start_over}") from None
    if metadata.get(DIGEST_KEY) != tensors_digest(tensors, record_json):
        raise RetrofitError(f"{path} was modified after it was written (digest mismatch); {start_over}")
    if record.get("format") != FORMAT:
        raise RetrofitError(f"{path} is of another format ({record.get('format')!r})")

    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    rng = []
    for rank, r in enumerate(record["rng"]):
        cuda = [tensors[f"rng.{rank}.cuda.{i}"] for i in range(r["cuda"])]
        rng.append({"torch": tensors[f"rng.{rank}.torch"], "cuda": cuda, "python": r["python"], "numpy": r["numpy"]})
    ema = strip("ema.") or None
    return TrainerState(
        epoch=int(record["epoch"]),
        updates=int(record["updates"]),
        model=strip("model."),
        ema=ema,
        optimizer={"record": record["optimizer"], "tensors": strip("optim.")},
        scheduler=record["scheduler"],
        rng=rng,
        best=record["best"],
        history=record["history"],
        config=record["config"],
        recipe=record["recipe"],
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load the name-keyed optimizer state of :func:`load_trainer_state` into ``optimizer``."""
    tensors = {f"optim.{k}": v for k, v in saved["tensors"].items()}
    optimizer.load_state_dict(_optimizer_from_named(saved["record"], tensors, optimizer))
