"""Atomic safetensors checkpoints that rebuild themselves from their recipe.

A checkpoint holds every tensor of the model's state dict and, in the safetensors metadata
(string values only):

* ``retrofit.recipe`` — the JSON :class:`~retrofit.recipe.Recipe`;
* ``retrofit.sha256`` — a digest of every tensor's name, dtype, shape and bytes, so a
  truncated or edited file is refused rather than loaded into a subtly wrong model.

Writes go to a temporary file in the target folder, are flushed to disk, then renamed over
the target: a crash at any point leaves either the old file or the new one, never a part.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RetrofitError
from .models import SOURCE_MARK, ModelSpec, build
from .weights import load_state_dict_strict
from .recipe import Recipe, recipe_of
from .verify import check_rebuild
from .surgery import MODEL_MARK, Retrofit, apply_plan
from .graph import Site, find_sites

RECIPE_KEY = "retrofit.recipe"
DIGEST_KEY = "retrofit.sha256"


def tensors_digest(tensors: dict[str, torch.Tensor], recipe_json: str = "") -> str:
    """SHA-256 over the recipe JSON and the names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256(recipe_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _contiguous_unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and (key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early, before any work, when ``path`` cannot be written.

    Raises :class:`RetrofitError` when it is empty, a directory, exists (without ``overwrite``),
    or the nearest of its folders that exists is not a folder (a file) or not writable.
    """
    path = Path(path)
    if not str(path) or str(path) in (".", ".."):
        raise RetrofitError("the output path is empty")
    if path.is_dir():
        raise RetrofitError(f"{path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise _exists(path)
    folder = path.parent  # the nearest folder that exists: the missing ones are made in it
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise RetrofitError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RetrofitError(f"cannot write {path}: folder {folder} is not writable")
    return path


def _exists(path: Path) -> RetrofitError:
    return RetrofitError(f"{path} exists; pass --overwrite to replace it, or choose another output")


def atomic_write_bytes(path: Path, data: bytes, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    With ``overwrite=False`` the finished file is hard-linked into place instead (``os.link``
    fails on an existing name), so a file that appeared at ``path`` while the data was made, by
    the user or a writer that takes no lock, is never replaced: :class:`RetrofitError`
    (``… exists``). Where the filesystem has no hard links, the rename after a last check.

    The temporary file (``.<name>.<random>.tmp``) is flocked while it exists, and temporary files
    of ``path`` that no live writer holds (left by a kill) are removed first
    (:mod:`retrofit.lock`). Ctrl-C, SIGTERM and SIGHUP take effect once the write is done or
    undone (:func:`retrofit.interrupts.deferred`): no signal leaves a temporary file. The file
    gets the usual permissions (0666 less the umask). Raises :class:`RetrofitError` naming
    ``path`` when the folder cannot be created or written.
    """
    from .interrupts import deferred
    from .lock import remove_stale_temps, temp_file

    with deferred():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(path)
            fd, tmp = temp_file(path)
        except OSError as e:
            raise RetrofitError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            if overwrite:
                os.replace(tmp, path)  # still flocked: no cleaner takes it for a dead writer's
            else:
                _link_new(tmp, path)
        except FileExistsError:
            tmp.unlink(missing_ok=True)
            raise _exists(path) from None
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RetrofitError(f"cannot write {path}: {e.strerror or e}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)


def _link_new(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if ``path`` does not exist (raises :class:`FileExistsError`)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FUSE filesystems): a last check, then the rename
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    overwrite: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``model``'s state dict and recipe to ``path`` (``.safetensors``), atomically.

    Before the first write of a recipe, the model is rebuilt from it and compared (keys,
    shapes, eval outputs on a probe, dropout / drop-path rates; see :mod:`retrofit.verify`):
    a checkpoint never reloads as a different model.

    Args:
        model: a model from :func:`retrofit.load_model`, retrofitted or not, or one built by
            timm or a torchvision builder (named by :func:`retrofit.source.model_source`).
        path: target file.
        overwrite: when False, an existing ``path`` is an error.
        extra: JSON-ready data stored in the recipe's ``extra`` (e.g. fine-tuning settings).

    Returns: the path written. Raises :class:`RetrofitError` if it exists and ``overwrite`` is False,
    when the model's architecture cannot be named, or when the recipe does not rebuild it
    (nothing is written then).
    """
    from safetensors.torch import save

    path = check_writable(path, overwrite)
    recipe = recipe_of(model, extra)
    check_rebuild(model, recipe)
    tensors = _contiguous_unshared(model.state_dict())
    recipe_json = recipe.to_json()
    metadata = {RECIPE_KEY: recipe_json, DIGEST_KEY: tensors_digest(tensors, recipe_json)}
    atomic_write_bytes(path, save(tensors, metadata=metadata), overwrite=overwrite)
    return path


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe stored in a checkpoint, without loading its tensors."""
    return _open(Path(path))[0]


def _open(path: Path) -> tuple[Recipe, dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise RetrofitError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise RetrofitError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from None
    if RECIPE_KEY not in metadata:
        raise RetrofitError(
            f"{path} is not a retrofit checkpoint (no recipe in its metadata); for plain weights pass the model "
            "name and --weights FILE"
        )
    return Recipe.from_json(metadata[RECIPE_KEY]), metadata


def rebuild(recipe: Recipe) -> nn.Module:
    """The recipe's architecture with its blocks inserted, random weights, no download."""
    source = recipe.source
    zoo, name = source.get("zoo"), source.get("model")
    if zoo not in ("timm", "torchvision") or not isinstance(name, str):
        raise RetrofitError(f"the checkpoint's recipe names model {name!r} of zoo {zoo!r}; retrofit builds timm "
                            "and torchvision models")
    try:
        model = build(ModelSpec(name, zoo, dict(source.get("kwargs") or {})))
    except (RuntimeError, ValueError, TypeError, KeyError) as e:  # e.g. timm "Unknown model (…)"
        written = (recipe.versions or {}).get(zoo)
        raise RetrofitError(
            f"cannot build the checkpoint's model {name!r} with this {zoo}"
            f"{f' (the checkpoint was written with {zoo} {written})' if written else ''}: {str(e).splitlines()[0]}"
        ) from None
    setattr(model, SOURCE_MARK, dict(source))
    input_size = tuple(recipe.input_size) if recipe.input_size else None
    if recipe.replaced:
        from .replace import replace_existing_se

        planned_swaps = [(r["path"], int(r["channels"]), dict(r["options"])) for r in recipe.replaced]
        replaced = replace_existing_se(model, recipe.block, init=recipe.init, planned=planned_swaps)
        record = Retrofit(recipe.block, recipe.placement, recipe.init, dict(recipe.options), [], input_size, replaced)
        setattr(model, MODEL_MARK, record)
        return model.eval()
    if not recipe.sites:
        return model.eval()
    recorded = _recorded_sites(recipe)
    if recorded is not None:
        try:
            return _insert_planned(model, recipe, recorded, input_size)
        except Exception:  # the recorded graph does not fit this timm/torchvision: find the sites again
            model = build(ModelSpec(name, zoo, dict(source.get("kwargs") or {})))
            setattr(model, SOURCE_MARK, dict(source))
    sites, _ = find_sites(model, input_size)
    by_key = {(s.owner, s.index): s for s in sites}
    found = []
    for entry in recipe.sites:
        site = by_key.get((entry["owner"], entry["index"]))
        if site is None or site.channels != entry.get("site_channels", site.channels):
            raise RetrofitError(
                f"site {entry['owner']} of the recipe is not in {source['model']} as built here "
                "(different timm/torchvision version?)"
            )
        found.append(site)
    return _insert_planned(model, recipe, found, input_size)


def _recorded_sites(recipe: Recipe) -> list[Site] | None:
    """The recipe's sites as recorded (fx node names included), or None for recipes before they were."""
    if not all(isinstance(entry.get("site"), dict) for entry in recipe.sites):
        return None
    sites = []
    for entry in recipe.sites:
        fields = dict(entry["site"])
        fields["fixed_args"] = tuple(tuple(pair) for pair in fields.get("fixed_args") or ())
        sites.append(Site(**fields))
    return sites


def _insert_planned(model: nn.Module, recipe: Recipe, sites: list[Site], input_size: tuple | None) -> nn.Module:
    planned = [(site, int(entry["channels"]), dict(entry["options"])) for site, entry in zip(sites, recipe.sites)]
    inserted = apply_plan(model, planned, recipe.block, recipe.placement, recipe.init)
    setattr(model, MODEL_MARK, Retrofit(recipe.block, recipe.placement, recipe.init, dict(recipe.options), inserted, input_size))
    return model.eval()


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, base: Any = None,
) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its tensors strictly.

    Nothing is downloaded: the architecture comes from timm/torchvision with random init, the
    recipe's blocks are re-inserted at the recorded sites, then every tensor is loaded. An adapter
    (:mod:`retrofit.adapter`: gates and maybe the head only) needs ``base``: the base weights it applies
    to — a weights file, a full retrofit checkpoint, a model or a state dict — loaded first, and
    refused unless they give the digest the adapter recorded.

    Returns: the model, in eval mode, on ``map_location``.

    Raises:
        RetrofitError: missing, truncated or edited file; a recipe that does not fit the
            architecture; keys or shapes that do not match; an adapter without ``base``, or with a
            base of another architecture or other weights; ``base`` with a full checkpoint.
    """
    from safetensors.torch import load_file

    path = Path(path)
    recipe, metadata = _open(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise RetrofitError(f"{path} is truncated or damaged: {e}") from None
    from .adapter import ADAPTER_KEY

    if DIGEST_KEY not in metadata:
        raise RetrofitError(f"{path} has no retrofit digest (not written by retrofit.save_checkpoint); refusing to load it")
    if metadata[DIGEST_KEY] != tensors_digest(tensors, metadata[RECIPE_KEY] + metadata.get(ADAPTER_KEY, "")):
        raise RetrofitError(f"{path} was modified after it was written (digest mismatch); refusing to load it")
    adapter = ADAPTER_KEY in metadata
    if adapter and base is None:
        raise RetrofitError(f"{path} is an adapter (inserted gates and head only): pass the base weights it applies "
                            f"to (base=… / --weights FILE; it was made from {recipe.source.get('model')} with weights "
                            f"{recipe.source.get('weights')!r})")
    if not adapter and base is not None:
        raise RetrofitError(f"{path} is a full checkpoint, which holds its own weights; base=/--weights applies to "
                            "an adapter")
    try:
        model = rebuild(recipe)
    except RetrofitError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise RetrofitError(f"the recipe in {path} does not describe a model retrofit can build: {e}") from None
    if adapter:
        from .adapter import apply_adapter

        apply_adapter(model, path, metadata[ADAPTER_KEY], tensors, base, dict(recipe.source))
    else:
        load_state_dict_strict(model, tensors, f"checkpoint {path.name}")
    finetune = recipe.extra.get("finetune") if isinstance(recipe.extra, dict) else None
    if isinstance(finetune, dict):  # what predict needs to see images as the fine-tuning run did
        model.retrofit_class_names = list(finetune.get("classes") or []) or None
        model.retrofit_data_config = finetune.get("data_config")
    return model.to(map_location).eval()


def is_checkpoint(target: str | os.PathLike) -> bool:
    """Whether ``target`` names a ``.safetensors`` file (a checkpoint) rather than a model."""
    return str(target).endswith(".safetensors")


def load_target(
    target: str | os.PathLike,
    *,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> nn.Module:
    """A retrofit checkpoint (``*.safetensors``) or a model name (see :func:`retrofit.load_model`).

    For an adapter (:mod:`retrofit.adapter`), ``weights`` is its base.

    ``num_classes`` builds a model name's classifier with that many classes (a checkpoint has its
    own: giving it is a :class:`RetrofitError`).
    """
    if is_checkpoint(target):
        from .adapter import is_adapter

        if weights is not None and not is_adapter(target):
            raise RetrofitError("--weights applies to a model name or an adapter, not to a full checkpoint")
        if num_classes is not None:
            raise RetrofitError("--num-classes applies to a model name; a checkpoint has its own classifier")
        return load_checkpoint(target, map_location, base=weights)
    from .models import load_model

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model, _, _ = load_model(str(target), pretrained=pretrained, weights=weights, **kwargs)
    return model.to(map_location)
