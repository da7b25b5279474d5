"""Insert channel-attention blocks at residual sites, rewriting only the modules that own them.

For each owner (e.g. ``layer1.0``), its shallow fx graph (see :mod:`retrofit.graph`) gets one
``call_module`` node per site, the block is registered as a child of the owner (keys
``<owner>.<block>.…``, e.g. ``layer1.0.eca.conv.weight``), and the regenerated code becomes
that instance's ``forward`` (a :class:`~retrofit.forward.RewrittenForward`, which survives
pickle, ``torch.save(model)``, spawn and deep copies). So the model keeps its class and methods (``forward_features``,
``reset_classifier``, ``pretrained_cfg`` of a timm model), every original state-dict key and
value, and its train/eval behaviour: children (BatchNorm, dropout, drop-path) are untouched
leaves, and an owner whose own code branches on ``self.training`` gets both traced graphs,
chosen at call time.

The placements (``standard``, ``pre``, ``post``, ``identity``; SE paper §6.5) and the rewrite of
one owner are :mod:`retrofit.rewrite`; this module chooses the sites and plans the blocks.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import nn

from .blocks import block_class, create_block
from .errors import RetrofitError
from .graph import Site, TraceFailure, find_sites
from .stages import stages_measurable
from .probe import default_input_size, preserved_state
from .rewrite import free_names, rewrite_owner
from .trace import Traced

PLACEMENTS = ("standard", "pre", "post", "identity")
#: Attribute that marks a rewritten owner; holds its :class:`InsertedSite` list.
OWNER_MARK = "_retrofit_sites"
#: Attribute on the root model holding the :class:`Retrofit` record of what was done.
MODEL_MARK = "_retrofit"


@dataclass(frozen=True)
class InsertedSite:
    """One inserted block: where, what, and how big.

    ``key`` is the state-dict prefix of its parameters (``layer1.0.eca``); ``channels`` is C of
    the map it gates (the unit's input channels for ``pre``); ``options`` are its resolved
    constructor kwargs (``kernel_size``, ``rd_channels``/``reduction``, ``groups``).
    """

    site: Site
    block: str
    placement: str
    attr: str
    channels: int
    options: dict[str, Any]
    params: int

    @property
    def owner(self) -> str:
        return self.site.owner

    @property
    def height(self) -> int:
        """H of the map the gate sees (the unit's input for ``pre``)."""
        return self.site.in_height if self.placement == "pre" else self.site.height

    @property
    def width(self) -> int:
        """W of the map the gate sees (the unit's input for ``pre``)."""
        return self.site.in_width if self.placement == "pre" else self.site.width

    @property
    def key(self) -> str:
        return f"{self.site.owner}.{self.attr}" if self.site.owner else self.attr

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (the recipe's per-site entry)."""
        s = self.site
        return {
            "owner": s.owner,
            "index": s.index,
            "attr": self.attr,
            "channels": self.channels,
            "site_channels": s.channels,
            "height": self.height,
            "width": self.width,
            "stage": s.stage,
            "projection": s.projection,
            "options": dict(self.options),
            "params": self.params,
            # the whole site (fx node names included): a rebuild re-inserts without a probe forward
            "site": dataclasses.asdict(s),
        }


@dataclass
class Retrofit:
    """What :func:`add_attention` did to a model; stored on it as ``model._retrofit``."""

    block: str
    placement: str
    init: str
    options: dict[str, Any]
    sites: list[InsertedSite] = field(default_factory=list)
    input_size: tuple[int, int, int] | None = None
    replaced: list[Any] = field(default_factory=list)  # retrofit.replace.Replacement


def check_placement_and_init(placement: str, init: str) -> None:
    """Raise :class:`RetrofitError` for a placement or init that is not one of retrofit's."""
    if placement not in PLACEMENTS:
        raise RetrofitError(f"unknown placement {placement!r}; choose one of: {', '.join(PLACEMENTS)}")
    if init not in ("identity", "paper"):
        raise RetrofitError(f"unknown init {init!r}; choose one of: identity, paper")


def add_attention(
    model: nn.Module,
    block: str = "eca",
    *,
    placement: str = "standard",
    reduction: int = 16,
    rd_divisor: int = 8,
    kernel_size: int | Sequence[int] | None = None,
    groups: int | None = None,
    init: str = "identity",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    stages: Sequence[int] | None = None,
    replace_existing: bool = False,
    input_size: tuple[int, int, int] | None = None,
) -> tuple[nn.Module, list[InsertedSite]]:
    """Retrofit channel attention into ``model`` at its residual sites, in place.

    Args:
        model: a CNN taking ``(N, 3, H, W)``; its class, methods and original state-dict keys
            are kept.
        block: ``"se"``, ``"eca"``, ``"se-var1"``, ``"se-var2"``, ``"se-var3"``, ``"se-gc"``
            (see :data:`retrofit.blocks.BLOCKS`).
        placement: ``"standard"``, ``"pre"``, ``"post"`` or ``"identity"``.
        reduction: SE reduction ratio r.
        rd_divisor: SE hidden width C/r is rounded to a multiple of it, at least it (timm's
            ``SEModule``); 1 gives the paper's ``C // r`` (see :func:`retrofit.blocks.se_hidden_width`).
        kernel_size: ECA k: None (adaptive), an odd int, or one odd int per stage with sites.
        groups: SE-GC group count (default 16); each site gets the largest divisor of its C
            not above it.
        init: ``"identity"`` (outputs unchanged at insertion) or ``"paper"``.
        include, exclude: owner-path patterns, glob or ``re:REGEX`` (full match). Each pattern
            must match at least one site.
        stages: keep sites of these stages: timm's ``feature_info`` index, else the stride
            level (stride 4 → 1, …, 32 → 4); see :attr:`retrofit.graph.Site.stage`.
        replace_existing: instead of inserting at residual sites, swap the model's existing SE
            modules for ``block`` (see :mod:`retrofit.replace`); the second return value is
            then a list of :class:`retrofit.replace.Replacement`.
        input_size: ``(C, H, W)`` of the dummy input used to find shapes.

    Returns:
        ``(model, sites)``: the same model object, rewritten, and one :class:`InsertedSite` per
        inserted block.

    Raises:
        RetrofitError: unknown block/placement/init, option out of range, no residual site,
            a pattern or stage that selects nothing, an already retrofitted model, or an owner
            whose forward cannot be rewritten.
    """
    cls = block_class(block)
    check_placement_and_init(placement, init)
    if getattr(model, MODEL_MARK, None) is not None:
        raise RetrofitError("this model already has retrofitted attention; start again from the base model")
    with preserved_state(model):  # re-tracing owners in train mode runs real code on real buffers
        return _add_attention(
            model, block, cls, placement=placement, reduction=reduction, rd_divisor=rd_divisor, kernel_size=kernel_size,
            groups=groups,
            init=init, include=include, exclude=exclude, stages=stages, replace_existing=replace_existing,
            input_size=input_size,
        )


def _add_attention(model: nn.Module, block: str, cls: type, *, placement: str, reduction: int, rd_divisor: int,
                   kernel_size: int | Sequence[int] | None, groups: int | None, init: str,
                   include: Sequence[str] | None, exclude: Sequence[str] | None, stages: Sequence[int] | None,
                   replace_existing: bool, input_size: tuple[int, int, int] | None,
                   ) -> tuple[nn.Module, list[Any]]:

    input_size = tuple(input_size or default_input_size(model))
    given = {"reduction": reduction, "rd_divisor": rd_divisor, "groups": groups,
             "kernel_size": list(kernel_size) if isinstance(kernel_size, (list, tuple)) else kernel_size}
    user_options = {k: v for k, v in given.items() if k in cls.OPTIONS}
    if replace_existing:
        if include or exclude or stages:
            raise RetrofitError("--replace-existing swaps every SE module; it takes no --include/--exclude/--stages")
        if placement != "standard":
            raise RetrofitError("--replace-existing swaps SE modules where they are; it takes no --placement")
        from .replace import replace_existing_se

        replaced = replace_existing_se(
            model, block, init=init, reduction=reduction, rd_divisor=rd_divisor, kernel_size=kernel_size,
            groups=groups,
        )
        setattr(model, MODEL_MARK, Retrofit(block, placement, init, user_options, [], input_size, replaced))
        return model, replaced
    traces: dict[str, Traced] = {}
    all_sites, failures = find_sites(model, input_size, traces=traces)
    if not all_sites:
        raise RetrofitError(no_site_message(model, failures))
    if (stages or isinstance(kernel_size, (list, tuple))) and not stages_measurable(all_sites):
        raise RetrofitError(
            f"at input size {'×'.join(map(str, input_size))} some residual maps shrink to 1 pixel, so their "
            "stages cannot be told apart; --stages and per-stage kernel sizes need a larger input size"
        )
    sites = select_sites(all_sites, include=include, exclude=exclude, stages=stages)
    if placement == "pre":
        odd = next((s for s in sites if not s.unit_input_is_map), None)
        if odd is not None:
            raise RetrofitError(
                f"placement 'pre' gates the residual unit's input, which at {odd.owner or '<root>'} is not one "
                "(N, C, H, W) map (a list or tuple of maps); use standard, post or identity, or --exclude that site"
            )
    kernel_for_stage = _kernel_per_stage(kernel_size, sites)

    planned: list[tuple[Site, int, dict[str, Any]]] = []
    for site in sites:
        channels = site.in_channels if placement == "pre" else site.channels
        options = cls.resolve(
            channels, reduction=reduction, rd_divisor=rd_divisor, kernel_size=kernel_for_stage(site.stage),
            groups=groups,
        )
        planned.append((site, channels, options))
    inserted = apply_plan(model, planned, block, placement, init, traces)
    setattr(model, MODEL_MARK, Retrofit(block, placement, init, user_options, inserted, input_size))
    return model, inserted


def apply_plan(
    model: nn.Module,
    planned: list[tuple[Site, int, dict[str, Any]]],
    block: str,
    placement: str,
    init: str,
    traces: dict[str, Traced] | None = None,
) -> list[InsertedSite]:
    """Build one block per ``(site, channels, options)`` and rewrite the owners.

    Every block is built before the model is touched, so an invalid option leaves it unchanged.
    ``traces`` are discovery's graphs of the owners (:func:`retrofit.graph.find_sites`), reused
    where they still fit.
    """
    blocks = [create_block(block, channels, init=init, **options) for _, channels, options in planned]
    param = next(model.parameters(), None)
    if param is not None:
        blocks = [b.to(param.device, param.dtype if param.is_floating_point() else None) for b in blocks]
    inserted: list[InsertedSite] = []
    by_owner: dict[str, list[int]] = {}
    for i, (site, _, _) in enumerate(planned):
        by_owner.setdefault(site.owner, []).append(i)
    for owner_path, indices in by_owner.items():
        owner = model.get_submodule(owner_path)
        for i in indices:
            blocks[i].train(owner.training)
        attrs = free_names(owner, block.replace("-", "_"), len(indices))
        rewrite_owner(owner, [(planned[i][0], attrs[j], blocks[i]) for j, i in enumerate(indices)], placement,
                      traced=(traces or {}).pop(owner_path, None))
        mine = []
        for j, i in enumerate(indices):
            site, channels, options = planned[i]
            params = sum(p.numel() for p in blocks[i].parameters())
            mine.append(InsertedSite(site, block, placement, attrs[j], channels, options, params))
        setattr(owner, OWNER_MARK, mine)
        inserted.extend(mine)
    order = {(s.owner, s.index): k for k, (s, _, _) in enumerate(planned)}
    return sorted(inserted, key=lambda s: order[(s.site.owner, s.site.index)])


def no_site_message(model: nn.Module, failures: list[TraceFailure]) -> str:
    name = type(model).__name__
    if failures:
        shown = "; ".join(f"{f.owner or '<root>'} ({f.module_type}): {f.reason}" for f in failures[:2])
        more = f" (and {len(failures) - 2} more)" if len(failures) > 2 else ""
        return f"no residual site found in {name}; these modules could not be traced: {shown}{more}"
    return f"no residual site found in {name}: it has no addition of a residual branch and a shortcut"


def _matches(pattern: str, owner: str) -> bool:
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], owner) is not None
        except re.error as e:
            raise RetrofitError(f"bad regular expression {pattern!r}: {e}") from None
    return fnmatch.fnmatchcase(owner, pattern)


def select_sites(
    sites: list[Site],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    stages: Sequence[int] | None = None,
) -> list[Site]:
    """Filter sites by owner patterns and stages; a pattern or stage that selects nothing is an error."""
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(_matches(pattern, s.owner) for s in sites):
                raise RetrofitError(
                    f"--{kind} {pattern!r} matches no site; sites are e.g. {', '.join(s.owner for s in sites[:3])}"
                    " (list them with `retrofit sites MODEL`)"
                )
    chosen = [s for s in sites if not include or any(_matches(p, s.owner) for p in include)]
    chosen = [s for s in chosen if not any(_matches(p, s.owner) for p in exclude or ())]
    if stages:
        present = sorted({s.stage for s in sites})
        for stage in stages:
            if stage not in present:
                raise RetrofitError(f"stage {stage} has no site; stages with sites: {', '.join(map(str, present))}")
        chosen = [s for s in chosen if s.stage in set(stages)]
    if not chosen:
        raise RetrofitError("the selection (--include/--exclude/--stages) leaves no site")
    return chosen


def _kernel_per_stage(kernel_size: int | Sequence[int] | None, sites: list[Site]) -> Callable[[int], int | None]:
    if not isinstance(kernel_size, (list, tuple)):
        return lambda stage: kernel_size
    stages = sorted({s.stage for s in sites})
    if len(kernel_size) != len(stages):
        raise RetrofitError(
            f"{len(kernel_size)} kernel sizes given for {len(stages)} stage(s) with sites "
            f"(stages {', '.join(map(str, stages))}); give one per stage"
        )
    table = dict(zip(stages, kernel_size))
    return lambda stage: table[stage]
