"""Issue 20, part 3: timm's augmentations in finetune — built by timm's factories, off unless asked, recorded in
the run's recipe so that a resume uses the same (and an exact resume stays exact)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from retrofit import read_recipe
from retrofit.cli import app
from retrofit.train.augment import make_criterion, make_mixup, mix
from retrofit.train.config import FinetuneConfig
from retrofit.train.data import transforms

DATA_CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "crop_pct": 0.875, "crop_mode": "center"}
AUG = ["--auto-augment", "rand-m9-mstd0.5-inc1", "--re-prob", "0.25", "--mixup", "0.2", "--cutmix", "1.0"]
COMMON = ["--hflip", "0", "--scale", "0.5,1", "--workers", "0", "--img-size", "32", "--epochs", "2", "-b", "50",
          "--warmup-epochs", "0", "--lr", "2e-3"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _steps(transform) -> dict[str, object]:
    return {type(t).__name__: t for t in transform.transforms}


def test_defaults_add_no_augmentation_of_timms():
    cfg = FinetuneConfig("resnet18", "d", "o")
    assert (cfg.auto_augment, cfg.re_prob, cfg.mixup, cfg.cutmix) == (None, 0.0, 0.0, 0.0)
    train, _ = transforms(DATA_CONFIG, hflip=0.0, scale=(0.5, 1.0), color_jitter=0.4)
    assert not {"RandAugment", "AutoAugment", "AugMixAugment", "RandomErasing"} & set(_steps(train))
    assert "ColorJitter" in _steps(train)
    assert make_mixup(cfg, 10) is None
    loss = make_criterion(cfg)
    assert type(loss) is torch.nn.CrossEntropyLoss and loss.label_smoothing == 0.1


def test_the_train_transform_holds_timms_randaugment_and_random_erasing():
    train, _ = transforms(DATA_CONFIG, hflip=0.0, scale=(0.5, 1.0), color_jitter=0.4,
                          auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", re_count=2)
    steps = _steps(train)
    assert "ColorJitter" not in steps  # timm drops it under RandAugment, which has its own colour operations
    rand = steps["RandAugment"]
    assert rand.num_layers == 2 and len(rand.ops) == 15 and rand.ops[0].magnitude == 9
    erase = steps["RandomErasing"]
    assert (erase.probability, erase.mode, erase.max_count) == (0.25, "pixel", 2)
    from PIL import Image

    assert train(Image.new("RGB", (8, 8), (200, 10, 10))).shape == (3, 32, 32)


def test_mixup_gives_soft_targets_with_the_smoothing_inside_and_a_soft_target_loss():
    from timm.loss import SoftTargetCrossEntropy

    cfg = FinetuneConfig("resnet18", "d", "o", mixup=0.2, cutmix=1.0, label_smoothing=0.1)
    mixup = make_mixup(cfg, 10)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.mode) == \
        (0.2, 1.0, 1.0, 0.5, "batch")
    assert type(make_criterion(cfg)) is SoftTargetCrossEntropy
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    mixed, targets = mix(mixup, images, labels)  # an odd batch loses its last image: timm pairs i with N-1-i
    assert mixed.shape == (4, 3, 8, 8) and targets.shape == (4, 10)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert targets.min().item() == pytest.approx(0.01)  # label smoothing 0.1 over 10 classes
    lam = targets[0, 0].item() - 0.01  # image 0 mixed with image 3: the weight left on label 0
    assert targets[0, 3].item() == pytest.approx(0.01 + 0.9 - lam, abs=1e-6)


@pytest.mark.parametrize(("args", "message"), [
    (["--auto-augment", "rand-m9-zz3"],
     "--auto-augment 'rand-m9-zz3' is not an augmentation timm knows (Unknown RandAugment config section); e.g. "
     "rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w4-d2"),
    (["--auto-augment", "foo"], "--auto-augment 'foo' is not an augmentation timm knows (Unknown AA policy foo)"),
    (["--re-mode", "noise"], "unknown --re-mode 'noise'; choose one of: const, rand, pixel"),
    (["--re-prob", "1.5"], "--re-prob must be a probability, got 1.5"),
    (["--mixup", "0.2", "-b", "25"], "--mixup/--cutmix pair each image with another of its batch: --batch-size must be even, got 25"),
    (["--mixup-mode", "row"], "unknown --mixup-mode 'row'; choose one of: batch, pair, elem"),
])
def test_bad_augmentation_options_are_one_line_and_write_nothing(tmp_path, args, message):
    result = run("finetune", "resnet18", "--data", tmp_path, *args, "-o", tmp_path / "run")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {message}"), line
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def augmented_runs(small_digits, lite0_weights, tmp_path_factory):
    """The same 2-epoch run with every augmentation on: straight through, and stopped after epoch 1 then resumed."""
    folder = tmp_path_factory.mktemp("augment")
    base = ["finetune", "tf_efficientnet_lite0", "--weights", lite0_weights, "--block", "eca", "--data", small_digits,
            *COMMON, *AUG]
    straight = run(*base, "-o", folder / "straight")
    assert straight.exit_code == 0, straight.output
    first = run(*base, "--until-epoch", 1, "-o", folder / "resumed")
    assert first.exit_code == 0, first.output
    return base, folder / "straight", folder / "resumed"


def test_the_augmentations_are_recorded_and_a_resume_with_others_is_refused(augmented_runs):
    base, _, resumed = augmented_runs
    recorded = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel", "re_count": 1,
                "mixup": 0.2, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch"}
    config = json.loads((resumed / "config.json").read_text())["config"]
    settings = read_recipe(resumed / "last.safetensors").extra["finetune"]["settings"]
    assert {k: config[k] for k in recorded} == recorded == {k: settings[k] for k in recorded}
    other = run(*[a if a != "0.2" else "0.4" for a in base], "--resume", "-o", resumed)
    assert other.exit_code == 2
    assert other.stderr.strip() == ("error: --mixup is 0.4 but the run being resumed used 0.2; resume with the same "
                                    "settings (or start a new run in another --output)")


def test_resume_with_mixup_and_randaugment_equals_the_uninterrupted_run(augmented_runs):
    base, straight, resumed = augmented_runs
    result = run(*base, "--resume", "-o", resumed)
    assert result.exit_code == 0, result.output
    a, b = load_file(str(straight / "last.safetensors")), load_file(str(resumed / "last.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    rows = [(straight / "metrics.csv").read_text().splitlines(), (resumed / "metrics.csv").read_text().splitlines()]
    assert [r.split(",")[:6] for r in rows[0]] == [r.split(",")[:6] for r in rows[1]]  # epoch … val_top5
