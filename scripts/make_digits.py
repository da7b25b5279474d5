"""Write the scikit-learn digits set (1,797 real 8×8 handwritten digits, 10 classes) as an ImageFolder tree.

    python scripts/make_digits.py data/digits            # → data/digits/{train,val}/<digit>/NNNN.png
    retrofit finetune tf_efficientnet_lite0 --weights lite0.safetensors --block eca --data data/digits ...

The split is stratified and deterministic (``--seed``); see :func:`retrofit.train.digits.write_digits`.
"""

from __future__ import annotations

import argparse
import sys

from retrofit.errors import RetrofitError
from retrofit.train.digits import write_digits


def main(argv: list[str] | None = None, *, write=write_digits, description: str = __doc__,
         val_fraction: float = 0.2) -> int:
    """The command line of this script and of ``make_faces.py`` (``write``: the set's writer)."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("folder", help="target root; train/ and val/ are created inside it")
    parser.add_argument("--val-fraction", type=float, default=val_fraction,
                        help=f"share of each class in val/ (default {val_fraction:g})")
    parser.add_argument("--seed", type=int, default=0, help="random state of the split (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing train/ and val/ trees")
    args = parser.parse_args(argv)
    try:
        counts = write(args.folder, val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite)
    except RetrofitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
