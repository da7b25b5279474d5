"""Issue 12: docs/design.md's walk names only modules and functions that exist."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_and_function_the_design_doc_names_exists():
    text = (ROOT / "docs" / "design.md").read_text()
    walk = text.split("## One model through the code", 1)[1].split("\n## ", 1)[0]
    named = 0
    # "`retrofit/x.py` `fn`, `fn2`": each function named after a module path belongs to that module
    for sentence in re.split(r"(?=`retrofit/)", walk):
        m = re.match(r"`(retrofit/[\w/]+\.py)`", sentence)
        if not m:
            continue
        path = ROOT / m.group(1)
        assert path.is_file(), m.group(1)
        module = importlib.import_module(m.group(1)[:-3].replace("/", "."))
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", re.split(r"[;(]", sentence[m.end():])[0]):
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part, None)
            assert obj is not None, f"{m.group(1)} has no {name}"
            named += 1
    assert named >= 20
    for path in re.findall(r"`(retrofit/[\w/]+\.py)`", text):  # the file table too
        assert (ROOT / path).is_file(), path
