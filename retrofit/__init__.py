"""retrofit: add SE or ECA channel attention to a pretrained CNN, fine-tune it, save safetensors.

Public API::

    from retrofit import load_model, add_attention, save_checkpoint, load_checkpoint
"""

__version__ = "0.1.0"

from .blocks import BLOCKS, create_block, eca_kernel_size  # noqa: E402
from .checkpoint import load_checkpoint, read_recipe, save_checkpoint  # noqa: E402
from .errors import RetrofitError  # noqa: E402
from .graph import Site, find_sites  # noqa: E402
from .models import load_model  # noqa: E402
from .surgery import PLACEMENTS, InsertedSite, add_attention  # noqa: E402

__all__ = [
    "BLOCKS",
    "PLACEMENTS",
    "InsertedSite",
    "RetrofitError",
    "Site",
    "add_attention",
    "create_block",
    "eca_kernel_size",
    "find_sites",
    "load_checkpoint",
    "load_model",
    "read_recipe",
    "save_checkpoint",
]
