"""Write scikit-image's LFW subset (200 real 25×25 photographs: 100 faces, 100 non-faces) as an ImageFolder tree.

    python scripts/make_faces.py data/faces              # → data/faces/{train,val}/{face,non-face}/NNNN.png
    retrofit finetune tf_efficientnet_lite0 --weights lite0.safetensors --block eca --data data/faces ...

The split is stratified and deterministic (``--seed``); see :func:`retrofit.train.faces.write_faces`.
"""

from __future__ import annotations

import sys

from make_digits import main  # the same command line, beside this script

from retrofit.train.faces import write_faces

if __name__ == "__main__":
    sys.exit(main(write=write_faces, description=__doc__, val_fraction=0.5))
