"""Issue 9, item 8: small frictions a new user meets — help text, the progress bar, random weights, ImageNet."""

from __future__ import annotations

import io
import math

import pytest
import torch
from typer.testing import CliRunner

from retrofit.cli import app

COMMANDS = [[], ["add"], ["add-se"], ["add-eca"], ["sites"], ["finetune"], ["predict"], ["compare"],
            ["report", "params-flops"], ["demo", "weights"], ["demo", "photos"], ["save"], ["export"]]


def run(*args, **env):
    return CliRunner().invoke(app, [str(a) for a in args], env=env or None)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "retrofit")
def test_help_shows_no_type_beside_flags(command):
    result = run(*command, "--help", COLUMNS="200")
    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output


def test_help_still_shows_the_type_of_options_that_take_a_value():
    result = run("finetune", "--help", COLUMNS="200")
    epochs = next(line for line in result.output.splitlines() if "--epochs " in line)
    resume = next(line for line in result.output.splitlines() if "--resume " in line)
    assert "<int>" in epochs and "<" not in resume.split("--resume")[1].split("Continue")[0]


def test_the_progress_bar_never_shows_a_nan_loss():
    """The first frame comes before any loss is known: it shows ``loss –``, not ``loss nan``."""
    from rich.console import Console

    from retrofit.train import distributed, report
    from retrofit.train.config import FinetuneConfig
    from retrofit.train.loop import Trainer

    config = FinetuneConfig("resnet18", data="-", output="-", epochs=1, warmup_epochs=0, batch_size=4)
    trainer = Trainer(config, distributed.Dist(0, 1, 0, torch.device("cpu")))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), torch.tensor([0, 1, 2, 0]), []) for _ in range(3)]
    trainer.prepare(model, len(batches))
    trainer.enter_phase(False)
    screen = io.StringIO()
    console = Console(file=screen, width=200, color_system=None)
    progress = report.progress_bar(console)
    frames = []
    add_task, update = progress.add_task, progress.update

    def frame() -> None:
        with console.capture() as captured:
            console.print(progress.get_renderable())
        frames.append(captured.get())

    def recorded_add_task(*args, **kwargs):
        task = add_task(*args, **kwargs)
        frame()
        return task

    def recorded_update(*args, **kwargs):
        update(*args, **kwargs)
        frame()

    progress.add_task, progress.update = recorded_add_task, recorded_update
    result = trainer.train_one_epoch(0, batches, progress)
    assert len(frames) == 4 and "loss –" in frames[0]
    assert not any("nan" in f for f in frames)
    last = float(frames[-1].split("loss ")[1].split()[0])
    assert math.isclose(last, result["train_loss"], abs_tol=5e-5)  # the bar's last loss is the epoch's


def test_predict_warns_on_random_weights_and_not_on_fine_tuned_ones(small_digits, photos, tmp_path):
    random = tmp_path / "r18-eca.safetensors"
    assert run("add-eca", "resnet18", "--no-pretrained", "-o", random).exit_code == 0
    result = run("predict", random, photos[0], "--top", 1)
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == (f"warning: {random} has random weights (made with --no-pretrained, never "
                                     "trained): its predictions mean nothing")
    named = run("predict", "resnet18", "--no-pretrained", photos[0], "--top", 1)
    assert named.stderr.strip().startswith("warning: resnet18 has random weights")
    tuned = run("finetune", "resnet18", "--no-pretrained", "--data", small_digits, "--epochs", 1, "--img-size", 32,
                "-b", 20, "--workers", 0, "-o", tmp_path / "run")
    assert tuned.exit_code == 0, tuned.output
    result = run("predict", tmp_path / "run" / "best.safetensors", photos[0], "--top", 1)
    assert result.exit_code == 0 and result.stderr == "", result.output


def test_torchvision_imagenet_is_never_offered_a_download(tmp_path):
    common = ["finetune", "resnet18", "--no-pretrained", "--data", "torchvision:ImageNet",
              "--dataset-root", tmp_path / "datasets", "-o", tmp_path / "o"]
    line = error_line(run(*common))
    assert line.startswith(f"error: torchvision dataset ImageNet not found under {tmp_path / 'datasets'}; "
                           "torchvision cannot download ImageNet: place its files there yourself")
    assert "--download" not in line
    line = error_line(run(*common, "--download"))
    assert line.startswith(f"error: torchvision cannot download ImageNet; place its files under {tmp_path / 'datasets'}")
