"""`retrofit finetune` (issue 5): the six acceptance items, plus the one-line errors.

Real inputs only: the scikit-learn digits written as an ImageFolder tree and the real
EfficientNet-Lite0 ImageNet weights. Runs use 32-px inputs, so a CPU finishes in minutes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from retrofit import load_checkpoint, read_recipe
from retrofit.checkpoint import save_checkpoint, tensors_digest
from retrofit.cli import app
from retrofit.models import load_model
from retrofit.train.digits import write_digits
from retrofit.train.loop import Trainer
from retrofit.train.model import replace_head
from retrofit.train.state import load_trainer_state

RETROFIT = str(Path(sys.executable).parent / "retrofit")
#: Augmentation for 8×8 digits: no flips (a flipped 2 is no 2), mild crops.
DIGIT_AUG = ["--hflip", "0", "--scale", "0.5,1", "--workers", "0", "--img-size", "32"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(result, *fragments):
    """Non-zero exit and exactly one line on stderr (stdout may hold the progress lines before it)."""
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ 1, 6: the digits run
@pytest.fixture(scope="module")
def digits_run(digits, lite0_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run") / "run"
    result = run("finetune", "tf_efficientnet_lite0", "--weights", lite0_weights, "--block", "eca",
                 "--data", digits, "--epochs", 2, "-b", 32, "--lr", 2e-3, "--warmup-epochs", 0, *DIGIT_AUG, "-o", out)
    return result, out


@pytest.mark.slow
def test_digits_lite0_eca_reaches_half_top1(digits_run, digits):
    result, out = digits_run
    assert result.exit_code == 0, result.output
    history = rows(out)
    assert [r["epoch"] for r in history] == ["1", "2"]
    assert float(history[-1]["val_top1"]) >= 0.5, history
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    last, best = load_checkpoint(out / "last.safetensors"), load_checkpoint(out / "best.safetensors")
    assert read_recipe(out / "last.safetensors").block == "eca"
    assert sum(".eca." in k for k in last.state_dict()) == 9  # ECA at Lite0's 9 residual sites
    # best.safetensors is the model that scored best: re-evaluate it with timm's eval transform
    summary = json.loads((out / "summary.json").read_text())
    extra = read_recipe(out / "best.safetensors").extra["finetune"]
    assert extra["epoch"] == summary["best"]["epoch"]
    from PIL import Image
    from timm.data import create_transform

    cfg = extra["data_config"]
    transform = create_transform(tuple(cfg["input_size"]), interpolation=cfg["interpolation"], mean=tuple(cfg["mean"]),
                                 std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    files = sorted((digits / "val").glob("*/*.png"))
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    labels = torch.tensor([extra["classes"].index(f.parent.name) for f in files])
    with torch.no_grad():
        correct = (best(images).argmax(1) == labels).sum().item()
    assert correct == round(summary["best"]["top1"] * len(files))


@pytest.mark.slow
def test_predict_on_a_finetuned_checkpoint_sees_images_as_the_run_did(digits_run, digits):
    result, out = digits_run
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    files = sorted((digits / "val").glob("*/*.png"))
    predicted = run("predict", out / "best.safetensors", *files, "--top", 1, "--json")
    assert predicted.exit_code == 0, predicted.output[-2000:]
    preds = json.loads(predicted.output)["predictions"]
    assert load_checkpoint(out / "best.safetensors").retrofit_class_names == [str(i) for i in range(10)]
    assert all(p["names"][0] == str(p["classes"][0]) for p in preds)  # the recorded class names ('0' … '9')
    correct = sum(p["names"][0] == Path(p["image"]).parent.name for p in preds)
    assert correct == round(summary["best"]["top1"] * len(files))  # at the run's --img-size 32, not 224


@pytest.mark.slow
def test_report_profiles_a_finetuned_checkpoint_at_the_size_it_was_trained_at(digits_run):
    _, out = digits_run
    trained = json.loads((out / "config.json").read_text())["data_config"]["input_size"]
    assert trained == [3, 32, 32]
    result = run("report", "params-flops", out / "best.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["input_size"] == trained
    given = run("report", "params-flops", out / "best.safetensors", "--json", "--input-size", "3,64,64")
    assert json.loads(given.output)["input_size"] == [3, 64, 64]


def test_head_1000_to_10_is_replaced_and_reloads(digits_run, lite0_weights):
    result, out = digits_run
    assert result.exit_code == 0, result.output
    assert load_file(str(lite0_weights))["classifier.weight"].shape == (1000, 1280)
    config = json.loads((out / "config.json").read_text())
    assert config["head"] == {"classes_before": 1000, "classes": 10, "replaced": True}
    assert config["classes"] == [str(i) for i in range(10)]
    recipe = read_recipe(out / "last.safetensors")
    assert recipe.source["kwargs"]["num_classes"] == 10 and recipe.source["weights"] == "file:lite0.safetensors"
    model = load_checkpoint(out / "last.safetensors")
    assert model.get_classifier().weight.shape == (10, 1280)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    saved = load_file(str(out / "last.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ 2: resume
@pytest.mark.slow
def test_resume_equals_uninterrupted_run(small_digits, lite0_weights, tmp_path):
    common = ["finetune", "tf_efficientnet_lite0", "--weights", lite0_weights, "--block", "eca", "--data", small_digits,
              "--epochs", 2, "-b", 25, "--lr", 2e-3, "--warmup-epochs", 0.5, "--ema", "--seed", 3, *DIGIT_AUG]
    straight = run(*common, "-o", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output
    first = run(*common, "-o", tmp_path / "split", "--until-epoch", 1)
    assert first.exit_code == 0, first.output
    assert "continue with --resume" in first.output and len(rows(tmp_path / "split")) == 1
    for name in ("last.safetensors", "metrics.csv"):  # as if killed right after the trainer state was written
        (tmp_path / "split" / name).unlink()
    second = run(*common, "-o", tmp_path / "split", "--resume")
    assert second.exit_code == 0, second.output
    for name in ("last.safetensors", "ema.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys()
        diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        assert diff <= 1e-6, (name, diff)
    before = load_file(str(lite0_weights))["blocks.6.0.conv_pwl.weight"]
    assert not torch.equal(a["blocks.6.0.conv_pwl.weight"], before)  # it did train
    metrics = ("train_loss", "val_loss", "val_top1", "ema_val_top1")
    assert [[r[m] for m in metrics] for r in rows(tmp_path / "straight")] == \
           [[r[m] for m in metrics] for r in rows(tmp_path / "split")]


# ------------------------------------------------------------------ 3: torchrun
@pytest.mark.slow
def test_torchrun_two_cpu_processes_agree_and_write_once(small_digits, lite0_weights, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun's torchelastic_* folders
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--no-python", RETROFIT, "finetune", "tf_efficientnet_lite0", "--weights", str(lite0_weights),
           "--block", "eca", "--data", str(small_digits), "--epochs", "2", "-b", "10", "--lr", "2e-3",
           "--warmup-epochs", "0", *DIGIT_AUG, "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["rank_weight_digests"]
    saved = tensors_digest(load_file(str(out / "last.safetensors")))
    assert len(digests) == 2 and digests[0] == digests[1] == saved  # both ranks hold exactly the saved weights
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "best.safetensors", "config.json", "curves.png", "drift.csv", "gates.csv", "last.safetensors", "metrics.csv",
        "summary.json", "trainer_state.safetensors"])
    assert [r["epoch"] for r in rows(out)] == ["1", "2"]
    assert proc.stdout.count("epoch 2/2 ·") == 1  # one rank prints
    load_checkpoint(out / "last.safetensors")


_TEARDOWN_SCRIPT = """
import os, sys, torch
from retrofit.train import distributed
d = distributed.setup("cpu")
import timm.utils  # imports torch._dynamo, as a finetune run does after setup
from torch.nn.parallel import DistributedDataParallel
model = DistributedDataParallel(torch.nn.Linear(4, 2))
model(torch.ones(2, 4)).sum().backward()
distributed.all_reduce_sum(d, torch.ones(3))
del model
distributed.teardown(d)
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {d.rank} gloo threads after teardown: {sum('gloo' in n for n in names)}")
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_teardown_frees_the_gloo_group(tmp_path):
    """A group still alive after teardown is destroyed at interpreter exit, where Gloo can abort a
    finished run ("terminate called without an active exception"); seen in CI under torchrun."""
    script = tmp_path / "teardown.py"
    script.write_text(_TEARDOWN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the two ranks share stdout, so their lines may interleave: match, don't split
    found = sorted(re.findall(r"rank (\d) gloo threads after teardown: (\d+)", proc.stdout))
    assert found == [("0", "0"), ("1", "0")], proc.stdout


# ------------------------------------------------------------------ 4: SIGKILL
@pytest.mark.slow
def test_sigkill_during_training_leaves_a_loadable_last(small_digits, lite0_weights, tmp_path):
    out = tmp_path / "killed"
    args = ["finetune", "tf_efficientnet_lite0", "--weights", str(lite0_weights), "--data", str(small_digits),
            "--epochs", "30", "-b", "20", "--lr", "1e-3", *DIGIT_AUG, "-o", str(out)]
    proc = subprocess.Popen([RETROFIT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (out / "last.safetensors").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        time.sleep(0.7)  # inside a later epoch, possibly mid-write
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    model = load_checkpoint(out / "last.safetensors")
    epoch = read_recipe(out / "last.safetensors").extra["finetune"]["epoch"]
    assert 1 <= epoch < 30 and model.get_classifier().out_features == 10
    # nothing lost: the run continues from its last complete epoch (one more epoch here, to stay quick)
    done = load_trainer_state(out).epoch
    assert done in (epoch, epoch + 1)  # the kill may fall between the trainer state and last.safetensors
    resumed = run(*args, "--resume", "--until-epoch", done + 1)
    assert resumed.exit_code == 0, resumed.output
    assert [r["epoch"] for r in rows(out)] == [str(e) for e in range(1, done + 2)]
    assert read_recipe(out / "last.safetensors").extra["finetune"]["epoch"] == done + 1
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_checkpoint_finetuned_on_other_class_names_gets_a_new_head(digits_run, small_digits, tmp_path):
    _, first = digits_run
    source = first / "last.safetensors"
    # the same ten images per class under other names: "a" … "j" (still ten classes)
    letters = tmp_path / "letters"
    for split in ("train", "val"):
        for cls in sorted((small_digits / split).iterdir()):
            shutil.copytree(cls, letters / split / "abcdefghij"[int(cls.name)])
    args = ("finetune", source, "--data", letters, "--epochs", 1, "-b", 25, *DIGIT_AUG, "--lr", 1e-3)
    renamed = run(*args, "-o", tmp_path / "renamed")
    assert renamed.exit_code == 0, renamed.output
    assert "head 10 → 10 classes (new, other class names than the checkpoint's)" in renamed.output
    config = json.loads((tmp_path / "renamed" / "config.json").read_text())
    assert config["head"] == {"classes_before": 10, "classes": 10, "replaced": True}
    assert config["classes"] == list("abcdefghij")
    # the same names keep the fine-tuned head
    same = run("finetune", source, "--data", small_digits, "--epochs", 1, "-b", 25, *DIGIT_AUG, "--lr", 1e-3,
               "-o", tmp_path / "same")
    assert same.exit_code == 0, same.output
    assert json.loads((tmp_path / "same" / "config.json").read_text())["head"]["replaced"] is False


# ------------------------------------------------------------------ 5: frozen backbone
@pytest.mark.slow
def test_freeze_backbone_epoch_keeps_pretrained_weights_and_bn_stats(small_digits, lite0_weights, tmp_path):
    # a source whose head already has 10 classes, so the head's starting values are known
    model, _, _ = load_model("tf_efficientnet_lite0", weights=lite0_weights)
    replace_head(model, 10)
    source = save_checkpoint(model, tmp_path / "lite0-10.safetensors")
    start = load_file(str(source))
    out = tmp_path / "frozen"
    result = run("finetune", source, "--block", "eca", "--data", small_digits, "--epochs", 2,
                 "--freeze-backbone-epochs", 1, "--until-epoch", 1, "-b", 25, "--lr", 1e-3, "--bn-stats", "train", *DIGIT_AUG,
                 "-o", out)
    assert result.exit_code == 0, result.output
    assert "backbone frozen" in result.output
    after = load_file(str(out / "last.safetensors"))
    pretrained = [k for k in start if not k.startswith("classifier.")]
    assert any(k.endswith("running_var") for k in pretrained) and any(k.endswith("num_batches_tracked") for k in pretrained)
    unchanged = [k for k in pretrained if torch.equal(after[k], start[k])]
    assert unchanged == pretrained
    gates = [k for k in after if ".eca." in k]
    assert len(gates) == 9 and all(after[k].abs().sum() > 0 for k in gates)  # identity init is all zeros
    assert not torch.equal(after["classifier.weight"], start["classifier.weight"])
    assert not torch.equal(after["classifier.bias"], start["classifier.bias"])
    # the second epoch trains the backbone too
    result = run("finetune", source, "--block", "eca", "--data", small_digits, "--epochs", 2,
                 "--freeze-backbone-epochs", 1, "-b", 25, "--lr", 1e-3, "--bn-stats", "train", *DIGIT_AUG, "-o", out,
                 "--resume")
    assert result.exit_code == 0, result.output
    final = load_file(str(out / "last.safetensors"))
    assert not torch.equal(final["blocks.6.0.conv_pwl.weight"], start["blocks.6.0.conv_pwl.weight"])
    assert not torch.equal(final["bn2.running_mean"], start["bn2.running_mean"])


# ------------------------------------------------------------------ errors
def test_missing_data_folder(tmp_path):
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path / "nowhere", "-o", tmp_path / "o")
    assert_one_line_error(result, "data folder not found", "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path / "file.png", "-o", tmp_path / "o")
    assert_one_line_error(result, "file.png is a file; give an ImageFolder folder")
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path, "-o", tmp_path / "file.png")
    assert_one_line_error(result, "--output", "file.png is a file; finetune writes a run folder")
    assert (tmp_path / "file.png").read_bytes() == b"x"
    (tmp_path / "run" / "last.safetensors").parent.mkdir()
    (tmp_path / "run" / "last.safetensors").write_bytes(b"mine")
    result = run("finetune", "resnet18", "--weights", tmp_path / "nope.pth", "--data", tmp_path, "-o", tmp_path / "run")
    assert_one_line_error(result, "weights file not found", "nope.pth")  # before the existing run is named


def test_batch_one_with_a_one_pixel_map_names_batch_and_image_size(small_digits, tmp_path):
    # resnet18 shrinks 8×8 to 1×1 before layer4: BatchNorm would see one value per channel
    result = run("finetune", "resnet18", "--no-pretrained", "--bn-stats", "train", "--data", small_digits, "-b", 1,
                 "--img-size", 8, "--epochs", 1, "-o", tmp_path / "o")
    assert_one_line_error(result, "--batch-size 1 at --img-size 8", "use --batch-size 2 or more")
    assert not (tmp_path / "o" / "last.safetensors").exists()


def test_under_torchrun_each_rank_names_itself_in_its_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path, "-o", tmp_path / "o", "--lr", -1)
    assert_one_line_error(result, "error: [rank 1 of 2] --lr must be a positive number")


def test_a_one_update_run_has_no_scheduler_warning(small_digits, tmp_path, caplog):
    result = run("finetune", "resnet18", "--no-pretrained", "--data", small_digits, "-b", 100, "--epochs", 1,
                 "--img-size", 16, "--warmup-epochs", 0, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "1 batches/epoch" in result.output
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("timm.scheduler")]


def test_workers_beyond_four_per_cpu_are_refused(tmp_path):
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path, "-j", 100000, "-o", tmp_path / "o")
    assert_one_line_error(result, f"--workers must be between 0 and {4 * os.cpu_count()}", "got 100000")


def test_seed_range_and_no_pretrained_with_a_checkpoint(tmp_path):
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path, "--seed", 2**70, "-o", tmp_path / "o")
    assert_one_line_error(result, "--seed must be between 0 and 2**63 - 1")
    result = run("finetune", tmp_path / "c.safetensors", "--no-pretrained", "--data", tmp_path, "-o", tmp_path / "o")
    assert_one_line_error(result, "--no-pretrained applies to a model name; a checkpoint holds its own weights")


def test_resume_mismatch_reads_as_the_command_line():
    import dataclasses

    from retrofit.train.config import FinetuneConfig, resume_mismatch

    saved = FinetuneConfig("resnet18", data="d", output="o", block="eca", include=["layer4.*"], pretrained=False)
    cases = {
        "SOURCE is 'resnet34' but the run being resumed used 'resnet18'": dict(source="resnet34"),
        "--no-pretrained is not given but the run being resumed used it": dict(pretrained=True),
        f"--ema is {'off' if saved.ema else 'on'} but the run being resumed had it {'on' if saved.ema else 'off'}":
            dict(ema=not saved.ema),
        "--include is a,b but the run being resumed used layer4.*": dict(include=["a", "b"]),
        "--block is not given but the run being resumed used 'eca'": dict(block=None),
    }
    for message, change in cases.items():
        assert resume_mismatch(saved.to_dict(), dataclasses.replace(saved, **change)).startswith(message + ";")


def test_under_torchrun_a_peer_gone_and_ctrl_c_name_the_rank(monkeypatch):
    import typer

    from retrofit.cli.app import handle_errors

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    demo = typer.Typer()

    @demo.command()
    @handle_errors
    def go(what: str) -> None:
        if what == "peer":
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1188")
        raise KeyboardInterrupt("epoch 1 is saved in o; continue with --resume")

    peer = CliRunner().invoke(demo, ["peer"])
    assert_one_line_error(peer, "error: [rank 0 of 2] another process of the run stopped (its own error line says why)")
    interrupted = CliRunner().invoke(demo, ["ctrl-c"])
    assert interrupted.exit_code == 130
    assert interrupted.stderr.strip() == "error: [rank 0 of 2] interrupted; epoch 1 is saved in o; continue with --resume"


def test_data_without_train_split(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path / "d", "-o", tmp_path / "o")
    assert_one_line_error(result, "train not found", "--val-data")


def test_fewer_than_two_classes(small_digits, tmp_path):
    for split in ("train", "val"):
        shutil.copytree(small_digits / split / "3", tmp_path / "d" / split / "3")
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path / "d", "-o", tmp_path / "o")
    assert_one_line_error(result, "at least 2 class folders", "only '3'")


def test_class_folders_without_images(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path / "d", "-o", tmp_path / "o")
    assert_one_line_error(result, "no images in", "train")


def test_torchvision_dataset_absent_offline_says_download(tmp_path):
    result = run("finetune", "resnet18", "--no-pretrained", "--data", "torchvision:CIFAR10",
                 "--dataset-root", tmp_path / "datasets", "-o", tmp_path / "o")
    assert_one_line_error(result, "torchvision dataset CIFAR10 not found under", "pass --download")
    assert not (tmp_path / "o").exists()


def test_unreadable_image_is_named_or_skipped_with_a_count(small_digits, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(small_digits, data)
    (data / "val" / "4" / "broken.png").write_bytes(b"this is not a png")
    common = ["finetune", "tf_efficientnet_lite0", "--no-pretrained", "--data", data, "--epochs", 1, "-b", 50,
              *DIGIT_AUG]
    result = run(*common, "-o", tmp_path / "stop")
    assert_one_line_error(result, "cannot read image", "broken.png", "--skip-bad-images")
    assert not (tmp_path / "stop" / "last.safetensors").exists()
    result = run(*common, "-o", tmp_path / "skip", "--skip-bad-images")
    assert result.exit_code == 0, result.output
    assert rows(tmp_path / "skip")[0]["skipped_images"] == "1"


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_epoch(small_digits, tmp_path, monkeypatch):
    prepare = Trainer.prepare

    def nan_on_third_batch(self, model, batches_per_epoch):
        prepare(self, model, batches_per_epoch)
        criterion, calls = self.criterion, []

        def loss(logits, labels):
            calls.append(1)
            value = criterion(logits, labels)
            return value * float("nan") if len(calls) == 3 else value

        self.criterion = loss

    monkeypatch.setattr(Trainer, "prepare", nan_on_third_batch)
    out = tmp_path / "o"
    result = run("finetune", "tf_efficientnet_lite0", "--no-pretrained", "--data", small_digits, "--epochs", 3,
                 "-b", 50, *DIGIT_AUG, "-o", out)
    # 2 batches per epoch: batch 3 is epoch 2, batch 1
    assert_one_line_error(result, "loss became nan at step 3 (epoch 2, batch 1)", "epoch 1 is still saved in")
    assert read_recipe(out / "last.safetensors").extra["finetune"]["epoch"] == 1
    assert len(rows(out)) == 1


def test_cuda_out_of_memory_suggests_a_batch_size(small_digits, tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_one_epoch", out_of_memory)
    result = run("finetune", "tf_efficientnet_lite0", "--no-pretrained", "--data", small_digits, "--epochs", 1,
                 "-b", 50, *DIGIT_AUG, "-o", tmp_path / "o")
    assert_one_line_error(result, "out of memory at --batch-size 50", "try --batch-size 25")


def test_existing_run_is_not_overwritten_and_resume_needs_same_settings(small_digits, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "last.safetensors").write_bytes(b"precious")  # a file of the user's, not a run
    common = ["finetune", "tf_efficientnet_lite0", "--no-pretrained", "--data", small_digits, "-b", 50, *DIGIT_AUG]
    for extra in ([], ["--resume"], ["--overwrite"]):
        result = run(*common, "-o", out, *extra)
        assert_one_line_error(result, "holds last.safetensors but no retrofit run", "choose another --output")
        assert (out / "last.safetensors").read_bytes() == b"precious"
    (out / "last.safetensors").unlink()
    result = run(*common, "-o", out, "--epochs", 2, "--until-epoch", 1)
    assert result.exit_code == 0, result.output
    result = run(*common, "-o", out, "--epochs", 2)
    assert_one_line_error(result, "already holds a run", "--resume", "--overwrite")
    result = run(*common, "-o", out, "--resume", "--epochs", 2, "--lr", 0.1)
    assert_one_line_error(result, "--lr is 0.1 but the run being resumed used 0.001")
    result = run(*common, "-o", out, "--resume", "--epochs", 2, "--block", "eca")
    assert_one_line_error(result, "--block is 'eca' but the run being resumed had no --block")
    # a class folder renamed under the same --data: the head's rows would be read as other classes
    (small_digits / "train" / "9").rename(small_digits / "train" / "nine")
    (small_digits / "val" / "9").rename(small_digits / "val" / "nine")
    try:
        result = run(*common, "-o", out, "--resume", "--epochs", 2)
    finally:
        (small_digits / "train" / "nine").rename(small_digits / "train" / "9")
        (small_digits / "val" / "nine").rename(small_digits / "val" / "9")
    assert_one_line_error(result, "the data's classes differ from those of the run being resumed (missing: 9; new: nine)")


def test_an_overwrite_that_fails_before_its_first_epoch_puts_the_old_run_back(small_digits, tmp_path):
    out = tmp_path / "run"
    common = ["finetune", "resnet18", "--no-pretrained", "--data", small_digits, "--epochs", 1, "-j", 0, "-o", out]
    assert run(*common, "-b", 50, "--img-size", 16).exit_code == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert {"last.safetensors", "trainer_state.safetensors", "config.json", "metrics.csv"} <= set(before)
    # fails at its first step (batch 1 with 1×1 maps): the run it was replacing comes back whole
    failed = run(*common, "-b", 1, "--img-size", 8, "--bn-stats", "train", "--overwrite")  # frozen statistics need no batch
    assert_one_line_error(failed, "--batch-size 1 at --img-size 8", f"; the run it was replacing is back in {out}")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # what a SIGKILL during an --overwrite leaves (old run set aside, the new run's record only):
    # the next command in that folder puts the old run back, whatever its flags
    aside = out / ".replaced"
    aside.mkdir()
    for name in before:
        os.replace(out / name, aside / name)
    (out / "config.json").write_text(before["config.json"].decode().replace('"seed": 0', '"seed": 5'))
    again = run(*common, "-b", 50, "--img-size", 16)
    assert_one_line_error(again, "already holds a run")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # … and what a kill while it was being set aside leaves
    (out / ".replaced.tmp").mkdir()
    os.replace(out / "last.safetensors", out / ".replaced.tmp" / "last.safetensors")
    again = run(*common, "-b", 50, "--img-size", 16)
    assert_one_line_error(again, "already holds a run")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # its own checkpoint as SOURCE would be replaced too: refused
    own = run("finetune", out / "last.safetensors", "--data", small_digits, "-o", out, "--overwrite")
    assert_one_line_error(own, "is a file of the run in", "copy it elsewhere first")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # one that gets through its first epoch replaces it, and leaves nothing aside
    assert run(*common, "-b", 50, "--img-size", 16, "--overwrite", "--seed", 1).exit_code == 0
    after = {f.name: f.read_bytes() for f in out.iterdir()}
    assert set(after) == set(before) and after["last.safetensors"] != before["last.safetensors"]


def test_a_users_own_config_json_is_not_taken_for_a_run(small_digits, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    (out / "metrics.csv").write_text("a,b\n")
    for extra in ([], ["--overwrite"], ["--resume"]):
        result = run("finetune", "resnet18", "--no-pretrained", "--data", small_digits, "-o", out, *extra)
        assert_one_line_error(result, "holds a config.json that retrofit did not write")
        assert (out / "config.json").read_text() == '{"mine": 1}' and (out / "metrics.csv").read_text() == "a,b\n"
    (out / "config.json").unlink()  # a lone metrics.csv is no run either
    result = run("finetune", "resnet18", "--no-pretrained", "--data", small_digits, "-o", out, "--overwrite")
    assert_one_line_error(result, "holds metrics.csv but no retrofit run")
    # a folder named .replaced that retrofit did not make is never emptied
    (out / "metrics.csv").unlink()
    (out / ".replaced").mkdir()
    (out / ".replaced" / "mine.txt").write_text("mine")
    result = run("finetune", "resnet18", "--no-pretrained", "--data", small_digits, "-o", out, "--overwrite")
    assert_one_line_error(result, ".replaced is not a folder retrofit made")
    assert (out / ".replaced" / "mine.txt").read_text() == "mine"


def test_a_run_that_finished_no_epoch_can_be_started_again_and_a_tampered_state_is_refused(small_digits, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "run"
    out.mkdir()
    # what a run killed during its first epoch leaves: its run record only
    record = {"config": {"source": "tf_efficientnet_lite0", "data": str(small_digits), "epochs": 2, "seed": 0},
              "classes": [str(i) for i in range(10)], "versions": {}}
    (out / "config.json").write_text(json.dumps(record))
    common = ["finetune", "tf_efficientnet_lite0", "--no-pretrained", "--data", small_digits, "--epochs", 2,
              "-b", 50, *DIGIT_AUG, "-o", out]
    resumed = run(*common, "--resume")
    assert_one_line_error(resumed, "a run started there but finished no epoch", "start without --resume")
    first = run(*common, "--until-epoch", 1)
    assert first.exit_code == 0, first.output
    assert json.loads((out / "config.json").read_text())["config"]["epochs"] == 2
    state = out / "trainer_state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.conv_stem.weight"][0, 0, 0, 0] += 1.0
    save_file(tensors, str(state), metadata=metadata)
    tampered = run(*common, "--resume")
    assert_one_line_error(tampered, "modified after it was written (digest mismatch)", "--overwrite")


def test_ctrl_c_says_which_epoch_is_kept_and_how_to_continue(small_digits, tmp_path):
    out = tmp_path / "interrupted"
    args = ["finetune", "tf_efficientnet_lite0", "--no-pretrained", "--data", str(small_digits), "--epochs", "30",
            "-b", "20", *DIGIT_AUG, "-o", str(out)]
    # a shell without job control starts background jobs with SIGINT ignored, and Python keeps it
    # so: give the child the default disposition, as a terminal's foreground job has
    proc = subprocess.Popen([RETROFIT, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.csv").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: interrupted; ") and line.endswith("continue with --resume"), stderr
    epoch = int(line.split("; epoch ")[1].split(" is saved in")[0])
    assert epoch >= 1 and load_trainer_state(out).epoch == epoch


def test_models_with_auxiliary_outputs_train(tmp_path):
    """torchvision GoogLeNet returns (logits, aux2, aux1) in train mode; the loss uses the logits."""
    from PIL import Image

    for split, n in (("train", 4), ("val", 2)):
        for name, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (tmp_path / "d" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (64, 64), colour).save(tmp_path / "d" / split / name / f"{i}.png")
    result = run("finetune", "torchvision:googlenet", "--no-pretrained", "--data", tmp_path / "d", "--epochs", 1,
                 "-b", 4, "--img-size", 64, "--workers", 0, "-o", tmp_path / "run")
    assert result.exit_code == 0, result.output[-2000:]
    assert [r["epoch"] for r in rows(tmp_path / "run")] == ["1"]


@pytest.mark.parametrize("args, fragment", [
    (["--epochs", "0"], "--epochs must be between 1 and 10000, got 0"),
    (["--scale", "0.5"], "--scale takes 2 numbers"),
    (["--optimizer", "lamb"], "unknown optimizer 'lamb'"),
    (["--placement", "pre"], "--placement applies only with --block"),
    (["--block", "cbam"], "unknown block 'cbam'"),
    (["--until-epoch", "5", "--epochs", "2"], "--until-epoch must be between 1 and --epochs"),
    (["--img-size", "100000"], "--img-size must be between 8 and 4096 pixels, got 100000"),
    (["--block", "se", "-k", "3"], "--kernel-size applies to eca, not to se"),
    (["--block", "eca", "-r", "4"], "--reduction applies to se, not to eca"),
    (["--block", "eca", "--groups", "4"], "--groups applies to se-gc, not to eca"),
])
def test_bad_options_are_one_line_errors(args, fragment, tmp_path):
    result = run("finetune", "resnet18", "--no-pretrained", "--data", tmp_path, "-o", tmp_path / "o", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o").exists()


def test_write_digits_is_deterministic(tmp_path):
    write_digits(tmp_path / "a")
    write_digits(tmp_path / "b")
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert a == b and len(a) == 1797
    assert len(list((tmp_path / "a" / "val").rglob("*.png"))) == 360
    assert (tmp_path / "a" / "train" / "0" / "0000.png").read_bytes() == (tmp_path / "b" / "train" / "0" / "0000.png").read_bytes()
