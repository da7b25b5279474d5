"""Write scikit-image's LFW subset (200 real 25×25 photographs: 100 faces, 100 non-faces) as an ImageFolder tree.

    python scripts/make_faces.py data/faces              # → data/faces/{train,val}/{face,non-face}/NNNN.png
    retrofit finetune tf_efficientnet_lite0 --weights lite0.safetensors --block eca --data data/faces ...

The split is stratified and deterministic (``--seed``); see :func:`retrofit.train.faces.write_faces`.
"""

from __future__ import annotations

import argparse
import sys

from retrofit.errors import RetrofitError
from retrofit.train.faces import write_faces


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="target root; train/ and val/ are created inside it")
    parser.add_argument("--val-fraction", type=float, default=0.5, help="share of each class in val/ (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="random state of the split (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing train/ and val/ trees")
    args = parser.parse_args(argv)
    try:
        counts = write_faces(args.folder, val_fraction=args.val_fraction, seed=args.seed, overwrite=args.overwrite)
    except RetrofitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
