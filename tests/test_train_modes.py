"""Issue 20, part 1: ``retrofit finetune --train blocks|head`` trains what it says and writes an adapter that
rebuilds the best checkpoint exactly from the base weights.

Real inputs: 100 scikit-learn digits and the real EfficientNet-Lite0 ImageNet weights, 32 px, one epoch.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import retrofit
from retrofit.cli import app

AUG = ["--hflip", "0", "--scale", "0.5,1", "--workers", "0", "--img-size", "32", "--epochs", "1", "-b", "25",
       "--warmup-epochs", "0", "--lr", "2e-3"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(small_digits, lite0_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_modes")
    out = {}
    for mode in ("blocks", "head"):
        result = run("finetune", "tf_efficientnet_lite0", "--weights", lite0_weights, "--block", "eca", "--data",
                     small_digits, *AUG, "--train", mode, "-o", folder / mode)
        assert result.exit_code == 0, result.output
        out[mode] = folder / mode
    return out


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".eca." not in k and not k.startswith("classifier.")}


@pytest.mark.parametrize("mode", ["blocks", "head"])
def test_the_adapter_rebuilds_the_best_checkpoint_exactly(runs, lite0_weights, mode):
    adapter = runs[mode] / "best.adapter.safetensors"
    tensors = load_file(str(adapter))
    gates = sorted(k for k in tensors if ".eca." in k)
    assert len(gates) == 9 and sorted(set(tensors) - set(gates)) == ["classifier.bias", "classifier.weight"]
    assert tensors["classifier.weight"].shape == (10, 1280)
    assert 50_000 < adapter.stat().st_size < 70_000  # the 10×1280 head is most of it; best.safetensors is ~13.7 MB
    rebuilt = retrofit.load_checkpoint(adapter, base=lite0_weights)
    best = retrofit.load_checkpoint(runs[mode] / "best.safetensors")
    a, b = best.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert rebuilt.retrofit_class_names == [str(i) for i in range(10)]  # predict sees it as the run did


@pytest.mark.parametrize("mode", ["blocks", "head"])
def test_the_backbone_and_its_batchnorm_statistics_stay_the_base_weights(runs, lite0_weights, mode):
    base = load_file(str(lite0_weights))
    last = load_file(str(runs[mode] / "last.safetensors"))
    backbone = _backbone(last)
    assert len(backbone) == len([k for k in base if not k.startswith("classifier.")])
    assert all(torch.equal(v, base[k]) for k, v in backbone.items())
    gates = [v for k, v in last.items() if ".eca." in k]
    if mode == "head":  # identity init: the gates never trained, so they are still exactly zero
        assert all(torch.equal(g, torch.zeros_like(g)) for g in gates)
    else:
        assert sum(int(g.count_nonzero()) for g in gates) == sum(g.numel() for g in gates)


def test_resume_with_another_train_mode_is_refused(runs, small_digits, lite0_weights):
    result = run("finetune", "tf_efficientnet_lite0", "--weights", lite0_weights, "--block", "eca", "--data",
                 small_digits, *AUG, "--train", "head", "--resume", "-o", runs["blocks"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --train is 'head' but the run being resumed used 'blocks'; resume with "
                                     "the same settings (or start a new run in another --output)")


@pytest.mark.parametrize(("args", "message"), [
    (["--train", "all"], "unknown --train 'all'; choose one of: full, blocks, head"),
    (["--train", "blocks", "--freeze-backbone-epochs", "1"],
     "--freeze-backbone-epochs applies with --train full; --train blocks freezes the backbone every epoch"),
])
def test_bad_train_options_are_one_line(tmp_path, args, message):
    result = run("finetune", "resnet18", "--data", tmp_path, *args, "-o", tmp_path / "run")
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_save_adapter_of_a_full_finetune_is_refused(tmp_path, runs):
    """A --train full checkpoint has a trained backbone: no base the user has fits an adapter of it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from retrofit.checkpoint import DIGEST_KEY, RECIPE_KEY, tensors_digest

    with safe_open(str(runs["blocks"] / "last.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta[RECIPE_KEY])
    recipe["extra"]["finetune"]["settings"]["train"] = "full"
    text = json.dumps(recipe)
    full = tmp_path / "full.safetensors"
    save_file(tensors, str(full), metadata={RECIPE_KEY: text, DIGEST_KEY: tensors_digest(tensors, text)})
    result = run("save", full, "--adapter", "-o", tmp_path / "a.safetensors")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {full} was fine-tuned with --train full: its backbone changed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.safetensors"]
