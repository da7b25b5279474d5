"""Shared fixtures: the real EfficientNet-Lite0 weights and photos, written once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory):
    """Timm-keyed .safetensors of the real ImageNet EfficientNet-Lite0 weights."""
    from retrofit.demo import convert_lite0_weights

    return convert_lite0_weights(tmp_path_factory.mktemp("weights") / "lite0.safetensors")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """skimage's chelsea.png and coffee.png."""
    from retrofit.demo import write_photos

    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
