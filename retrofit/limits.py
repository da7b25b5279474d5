"""Input-size limits shared by every command (torch-free, so the CLI can check before importing torch).

Beyond them one probe image alone fills a machine's memory: ``--img-size 100000`` used to get the
process OOM-killed instead of a one-line error.
"""

#: Largest image side in pixels: ``--img-size`` (finetune) and H, W of ``--input-size`` (add, sites, report).
MAX_IMAGE_SIDE = 4096

#: Most input channels of ``--input-size``.
MAX_CHANNELS = 64
