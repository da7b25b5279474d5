"""The ablation grid: axes, cells, runs and shards.

A grid is the product of its axes (blocks × placements × stages × reductions × kernel sizes ×
train modes); each cell is trained once per seed, as one ``retrofit finetune`` run in
``OUTPUT/<cell id>/seed-<s>/``. Settings that do not apply to a cell are dropped before cells are
compared, so a cell that makes no sense on some axis (``none`` × ``--placements pre``, ``eca`` ×
``--reductions 8``) is one cell, run once:

* ``none``: no placement, stages, reduction or kernel size; ``noise`` (the base again with its learning rate
  × (1 + 1e-5), the recipe's run-to-run noise) likewise.
* a reduction only for blocks that take one (SE), a kernel size only for ECA.
* ``--train blocks`` (train only the inserted blocks and the head; backbone and BatchNorm
  statistics frozen: finetune's frozen phase for every epoch) of ``none`` trains the head alone:
  it is the ``head`` run.
* ``--train head`` (linear probe): inserted blocks would not train, and at identity init a
  retrofit computes exactly what its base does, so every identity-init block × ``head`` is the
  base's ``head`` run. A block without parameters (SE-Var1, always at its paper init) × ``head``
  is its ``blocks`` run. A block with parameters at ``--init paper`` × ``head`` is refused (the
  frozen phase would train it).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

from ..errors import RetrofitError

NONE = "none"
#: The noise control: the base model again, its learning rate changed by :data:`NOISE_LR_FACTOR` — no
#: difference anyone would call another recipe. Its paired difference to the base is the run-to-run noise
#: of the recipe: a block whose difference is no larger than it is not distinguishable from that noise.
NOISE = "noise"
NOISE_LR_FACTOR = 1 + 1e-5
TRAIN_MODES = ("full", "blocks", "head")
ADAPTIVE = "adaptive"
#: The axes in the order cells are enumerated, with their command-line option.
AXES = {"blocks": "--blocks", "placements": "--placements", "stages": "--stages", "reductions": "--reductions",
        "kernel_sizes": "--kernel-sizes", "train": "--train", "seeds": "--seeds"}


@functools.lru_cache(maxsize=None)
def has_parameters(block: str) -> bool:
    """Whether ``block`` has trainable parameters (SE-Var1 has none: it cannot start as identity)."""
    from ..blocks import block_class, create_block

    probe = create_block(block, 64, init="paper", **block_class(block).resolve(64))
    return any(True for _ in probe.parameters())


@dataclass(frozen=True)
class Cell:
    """One setting of the grid, with what does not apply to it left None.

    ``stages``: None = all stages; ``kernel_size``: ``"adaptive"`` or an odd int; ``init``: the
    block's init (``paper`` for a block without parameters).
    """

    block: str
    placement: str | None = None
    stages: tuple[int, ...] | None = None
    reduction: int | None = None
    kernel_size: int | str | None = None
    train: str = "full"
    init: str | None = None

    @property
    def is_base(self) -> bool:
        return self.block == NONE

    @property
    def is_noise(self) -> bool:
        """The noise control (:data:`NOISE`): the base model, trained again with a perturbed learning rate."""
        return self.block == NOISE

    @property
    def inserts(self) -> bool:
        """Whether the cell's runs insert a block (not the base, not the noise control)."""
        return self.block not in (NONE, NOISE)

    @property
    def id(self) -> str:
        """Folder name, e.g. ``none_full``, ``eca_standard_stages-all_k-adaptive_full``, ``se_pre_stages-3+4_r-16_blocks``."""
        if not self.inserts:
            return f"{self.block}_{self.train}"
        parts = [self.block, str(self.placement), "stages-" + stages_text(self.stages, "+")]
        if self.reduction is not None:
            parts.append(f"r-{self.reduction}")
        if self.kernel_size is not None:
            parts.append(f"k-{self.kernel_size}")
        return "_".join(parts + [self.train])

    def base(self) -> "Cell":
        """The cell this one is compared with: ``none`` under the same training mode."""
        return canonical(NONE, None, None, None, None, self.train, "identity")

    def axes(self) -> dict[str, str]:
        """The cell as ``ablation.csv`` columns (empty where an axis does not apply)."""
        return {"block": self.block, "placement": self.placement or "",
                "stages": stages_text(self.stages, ",") if self.inserts else "",
                "reduction": "" if self.reduction is None else str(self.reduction),
                "kernel_size": "" if self.kernel_size is None else str(self.kernel_size), "train": self.train}


def stages_text(stages: tuple[int, ...] | None, sep: str) -> str:
    return "all" if stages is None else sep.join(map(str, stages))


def canonical(block: str, placement: str | None, stages: tuple[int, ...] | None, reduction: int | None,
              kernel_size: int | str | None, train: str, init: str) -> Cell:
    """The cell that runs this combination (see the module docstring)."""
    if block in (NONE, NOISE):
        return Cell(block, train="head" if train == "blocks" else train)
    from ..blocks import block_class

    options = block_class(block).OPTIONS
    cell_init = init if has_parameters(block) else "paper"
    if train == "head":
        if cell_init == "identity":
            return Cell(NONE, train="head")
        if not has_parameters(block):
            train = "blocks"
        else:
            raise RetrofitError(f"--train head with {block} at --init paper: finetune's frozen phase would train the "
                                "inserted blocks too; use --init identity (then every block × head is the base's "
                                "linear probe) or leave head out")
    return Cell(block, placement, stages, reduction if "reduction" in options else None,
                kernel_size if "kernel_size" in options else None, train, cell_init)


@dataclass(frozen=True)
class Run:
    """One (cell, seed): the finetune run in ``OUTPUT/<cell.id>/seed-<seed>/``."""

    cell: Cell
    seed: int

    @property
    def folder(self) -> str:
        return f"{self.cell.id}/seed-{self.seed}"


@dataclass(frozen=True)
class Grid:
    """The axes of an ablation (see the module docstring); defaults: base, ECA and SE, three seeds."""

    blocks: tuple[str, ...] = (NONE, "eca", "se")
    placements: tuple[str, ...] = ("standard",)
    stages: tuple[tuple[int, ...] | None, ...] = (None,)
    reductions: tuple[int, ...] = (16,)
    kernel_sizes: tuple[int | str, ...] = (ADAPTIVE,)
    train: tuple[str, ...] = ("full",)
    seeds: tuple[int, ...] = (0, 1, 2)
    init: str = field(default="identity")

    @classmethod
    def parse(cls, init: str = "identity", **texts: str | None) -> "Grid":
        """A grid from command-line texts (``blocks="none,eca"``, ``stages="all;3,4"``, …); None keeps the default.

        Raises :class:`RetrofitError` (one line) for a value that is not a number where one is needed.
        """
        unknown = sorted(set(texts) - set(AXES))
        if unknown:
            raise RetrofitError(f"unknown ablation axes: {', '.join(unknown)}")
        values: dict[str, tuple] = {}
        for axis, text in texts.items():
            if text is None:
                continue
            sep = ";" if axis == "stages" else ","
            items = [] if not text.strip() else [v.strip() for v in text.split(sep)]
            values[axis] = tuple(_parse_value(axis, v) for v in items)
        return cls(**values, init=init)

    def validate(self) -> None:
        """One-line :class:`RetrofitError` for an empty axis, a duplicate value, a value that is not an
        option of its axis, a seed out of range, or ``head`` with parameterised paper-init blocks."""
        from ..blocks import BLOCKS
        from ..surgery import PLACEMENTS

        options = {"blocks": (NONE, NOISE, *BLOCKS), "placements": PLACEMENTS, "train": TRAIN_MODES}
        for axis, flag in AXES.items():
            values = getattr(self, axis)
            if not values:
                raise RetrofitError(f"empty grid: {flag} has no values")
            seen = set()
            for v in values:
                if v in seen:
                    raise RetrofitError(f"{flag} lists {_shown(v)} twice")
                seen.add(v)
                if axis in options and v not in options[axis]:
                    raise RetrofitError(f"{flag}: {v!r} is not an option; choose from {', '.join(options[axis])}")
                _check_number(axis, flag, v)
        if NOISE in self.blocks and NONE not in self.blocks:
            raise RetrofitError("--blocks noise needs none in the grid too: the noise row is the base trained again, "
                                "compared with the base")
        if self.init not in ("identity", "paper"):
            raise RetrofitError(f"unknown init {self.init!r}; choose one of: identity, paper")
        self.cells()

    def cells(self) -> list[Cell]:
        """The distinct cells, in axis order (first occurrence kept)."""
        out: dict[Cell, None] = {}
        for block, placement, stages, reduction, kernel, train in itertools.product(
                self.blocks, self.placements, self.stages, self.reductions, self.kernel_sizes, self.train):
            out.setdefault(canonical(block, placement, stages, reduction, kernel, train, self.init))
        return list(out)

    def runs(self) -> list[Run]:
        """Every (cell, seed), seed-major: all cells of the first seed come first, so paired results appear early."""
        cells = self.cells()
        return [Run(cell, seed) for seed in self.seeds for cell in cells]


def shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """The runs of shard ``index`` of ``count`` (1-based): every ``count``-th run from the ``index``-th."""
    if not (isinstance(count, int) and isinstance(index, int) and count >= 1 and 1 <= index <= count):
        raise RetrofitError(f"--shard takes I/N with 1 ≤ I ≤ N, got {index}/{count}")
    return runs[index - 1::count]


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` → ``(2, 4)``; one-line error otherwise (including I outside 1..N)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise RetrofitError(f"--shard takes I/N (e.g. 1/4), got {text!r}") from None
    if not sep or n < 1 or not 1 <= i <= n:
        raise RetrofitError(f"--shard takes I/N with 1 ≤ I ≤ N, got {text!r}")
    return i, n


def _parse_value(axis: str, text: str) -> object:
    flag = AXES[axis]
    if axis in ("blocks", "placements", "train"):
        return text
    if axis == "kernel_sizes" and text == ADAPTIVE:
        return ADAPTIVE
    if axis == "stages":
        if text == "all":
            return None
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            raise RetrofitError(f"{flag} takes values separated by ';', each 'all' or stage numbers like 3,4; "
                                f"got {text!r}") from None
    try:
        return int(text)
    except ValueError:
        what = "'adaptive' or odd integers" if axis == "kernel_sizes" else "integers"
        raise RetrofitError(f"{flag} takes {what} separated by commas, got {text!r}") from None


def _check_number(axis: str, flag: str, v: object) -> None:
    if axis == "seeds" and not 0 <= v < 2**63:
        raise RetrofitError(f"{flag}: {v} is not an option; seeds are between 0 and 2**63 - 1")
    if axis == "reductions" and v < 1:
        raise RetrofitError(f"{flag}: {v} is not an option; a reduction ratio is a positive integer")
    if axis == "kernel_sizes" and v != ADAPTIVE and (v < 1 or v % 2 == 0):
        raise RetrofitError(f"{flag}: {v} is not an option; an ECA kernel size is 'adaptive' or a positive odd integer")
    if axis == "stages" and v is not None and (not v or min(v) < 1 or len(set(v)) != len(v)):
        raise RetrofitError(f"{flag}: {stages_text(v, ',')!r} is not an option; give distinct stage numbers ≥ 1, or all")


def _shown(v: object) -> str:
    return stages_text(v, ",") if v is None or isinstance(v, tuple) else str(v)
