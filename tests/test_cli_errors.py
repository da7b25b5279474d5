"""Bad input: one line on stderr, non-zero exit, no traceback, nothing written or overwritten."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from retrofit.cli import app


def run(*args):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_unknown_model_suggests_close_names(tmp_path):
    result = run("add-eca", "resnet51", "--no-pretrained", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "unknown model 'resnet51'", "did you mean", "resnet50")
    assert not any(tmp_path.iterdir())


def test_an_existing_file_given_as_target_is_called_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"x")
    for args in (["report", "params-flops", "photo.png"], ["predict", "photo.png", "photo.png"]):
        assert_one_line_error(run(*args), "'photo.png' is a file, not a model name or a retrofit checkpoint")
    (tmp_path / "resnet18").mkdir()  # a folder named like a model does not shadow the model
    assert run("report", "params-flops", "resnet18", "--no-pretrained", "--json").exit_code == 0


def test_unknown_torchvision_model(tmp_path):
    result = run("add-se", "torchvision:resnet5O", "--no-pretrained", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "torchvision:resnet50")


@pytest.mark.parametrize("name", ["vgg11", "torchvision:densenet121"])
def test_model_without_residual_sites(name, tmp_path):
    result = run("add-eca", name, "--no-pretrained", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "no residual site")
    assert not any(tmp_path.iterdir())


def test_transformer_token_additions_are_not_sites(tmp_path):
    result = run("add-eca", "vit_tiny_patch16_224", "--no-pretrained", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "no residual site")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["add-eca", "resnet18", "--kernel-size", "4"], "--kernel-size must be odd"),
        (["add-eca", "resnet18", "--kernel-size", "-3"], "--kernel-size must be between 1 and 1023, got -3"),
        (["add-eca", "resnet18", "--kernel-size", "a,b"], "integers separated by commas"),
        (["add-se", "resnet18", "--reduction", "0"], "--reduction must be between 1 and 1024, got 0"),
        (["add", "cbam", "resnet18"], "unknown block 'cbam'"),
        (["add-eca", "resnet18", "--placement", "middle"], "unknown placement"),
        (["add-eca", "resnet18", "--init", "zeros"], "unknown init"),
    ],
)
def test_options_out_of_range(args, fragment, tmp_path):
    result = run(*args, "--no-pretrained", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, fragment)
    assert not any(tmp_path.iterdir())


def test_output_exists_is_not_overwritten(tmp_path):
    import timm

    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    result = run("add-eca", "resnet18", "--no-pretrained", "-o", str(out))
    assert_one_line_error(result, "exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    # a wrong input is named first, so fixing the output is not followed by another error
    result = run("add-eca", "resnet18", "--weights", str(tmp_path / "nope.safetensors"), "-o", str(out))
    assert_one_line_error(result, "weights file not found", "nope.safetensors")
    assert out.read_bytes() == b"precious"
    assert run("add-eca", "resnet18", "--no-pretrained", "-o", str(out), "--overwrite").exit_code == 0
    assert out.read_bytes() != b"precious"
    # the weights file itself is never the output, even with --overwrite
    from safetensors.torch import save_file

    weights = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(weights))
    kept = weights.read_bytes()
    result = run("add-eca", "resnet18", "--weights", str(weights), "-o", str(weights), "--overwrite")
    assert_one_line_error(result, "is the --weights file itself")
    assert weights.read_bytes() == kept


def test_unreadable_weights_file(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"not a checkpoint")
    result = run("add-eca", "resnet18", "--weights", str(bad), "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "cannot read weights file")


def test_missing_weights_file(tmp_path):
    result = run("add-eca", "resnet18", "--weights", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "weights file not found")


def test_mismatched_weights_name_missing_and_unexpected_keys(tmp_path):
    import timm

    state = timm.create_model("resnet18").state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # wrappers are unwrapped
    result = run("add-eca", "resnet18", "--weights", str(path), "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "1 missing (fc.bias)", "1 unexpected (extra.weight)")
    # another architecture's file: the examples are weights, not BatchNorm counters
    other = {f"net.{k}": v for k, v in state.items()}
    other["a.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    torch.save(dict(sorted(other.items(), key=lambda kv: not kv[0].endswith("num_batches_tracked"))), path)
    result = run("add-eca", "resnet18", "--weights", str(path), "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "unexpected (net.conv1.weight, net.bn1.weight, net.bn1.bias")
    assert "num_batches_tracked" not in result.stderr


def test_weights_without_num_batches_tracked_load_like_pytorch_loads_them(tmp_path):
    import torchvision

    from retrofit.models import load_model

    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.bn1.running_var"] = torch.rand(64) + 0.5
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # PyTorch < 0.4.1 files
    assert len(state) - len(old) == 20
    path = tmp_path / "old.pth"
    torch.save(old, path)
    model, _, _ = load_model("torchvision:resnet18", weights=path)
    assert torch.equal(model.state_dict()["layer1.0.bn1.running_var"], state["layer1.0.bn1.running_var"])
    assert model.state_dict()["bn1.num_batches_tracked"].item() == 0


def test_wrapped_weights_load(tmp_path):
    import timm

    state = timm.create_model("resnet18").state_dict()
    path = tmp_path / "w.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    out = tmp_path / "x.safetensors"
    result = run("add-eca", "resnet18", "--weights", str(path), "-o", str(out))
    assert result.exit_code == 0, result.output


def test_offline_pretrained_says_how_to_pass_a_file(tmp_path, monkeypatch):
    import retrofit.models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda host: False)
    monkeypatch.setattr(models, "_hf_cached_file", lambda hub_id: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # nothing cached
    result = run("add-eca", "resnet18", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "'resnet18'", "--weights FILE", "--no-pretrained")
    result = run("add-eca", "torchvision:resnet18", "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "'torchvision:resnet18'", "--weights FILE")


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(app, ["--debug", "add-eca", "resnet51", "--no-pretrained"])
    assert result.exit_code != 0
    assert result.exception is not None and "resnet51" in str(result.exception)


def test_help_does_not_import_torch():
    code = "import sys; from retrofit.cli import app; import retrofit; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run(["retrofit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "add-eca" in out and "add-se" in out


def test_offline_hf_hub_model_fails_fast_in_one_line(tmp_path, monkeypatch):
    import retrofit.models as models

    monkeypatch.setattr(models, "_hub_reachable", lambda host: False)
    monkeypatch.setattr(models, "_hf_cached_config", lambda hub_id: False)
    monkeypatch.setattr(models, "_hf_cached_file", lambda hub_id: None)
    for extra in ([], ["--no-pretrained"]):
        result = run("add-eca", "hf-hub:timm/resnet18.a1_in1k", *extra, "-o", str(tmp_path / "x.safetensors"))
        # --no-pretrained would need the hub too (for the configuration): the hint is the timm name
        assert_one_line_error(result, "'hf-hub:timm/resnet18.a1_in1k'", "use the timm name 'resnet18' with --weights FILE")
        assert "--no-pretrained" not in result.stderr


def test_usage_errors_are_one_line_from_the_console_script():
    for args in (["add-se", "resnet18", "-k", "3"], ["add-eca"], ["--bogus"], ["add-se", "resnet18", "-r", "abc"]):
        proc = subprocess.run(["retrofit", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr)


def test_torchvision_init_warnings_do_not_join_the_error_line(tmp_path):
    # googlenet's builder warns (FutureWarning) about its default init; GoogLeNet has no residual site.
    # A real process: its stderr is where Python's default warning filters print (pytest records warnings instead).
    proc = subprocess.run(["retrofit", "add-eca", "torchvision:googlenet", "--no-pretrained",
                           "-o", str(tmp_path / "g.safetensors")], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "GoogLeNet" in proc.stderr, proc.stderr


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, console_script):
    # in this process, through the console script's main(): an exception that leaves main() is what prints
    # "Traceback (most recent call last)" in a process
    from retrofit.errors import RetrofitError

    (tmp_path / "w.pth").write_text("not weights")
    args = ["add-eca", "resnet18", "--weights", str(tmp_path / "w.pth"), "-o", str(tmp_path / "x.safetensors")]
    for argv in (["--debug", *args], [*args, "--debug"]):
        with pytest.raises(RetrofitError, match="w.pth"):
            console_script(*argv)
    proc = console_script(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("resnet18.bogus", "resnet18 has no pretrained tag 'bogus'; its tags: a1_in1k"),
        ("resnet18.pth", "looks like a file, not a model name"),
        ("hf-hub:", "is not a hub model id"),
    ],
)
def test_bad_names_and_tags(name, fragment, tmp_path):
    assert_one_line_error(run("sites", name), fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--input-size", "3,-1,224"], "three positive integers"),
        (["--input-size", "3,100000,100000"], "too large"),
        (["--kernel-size", "3,,5,7"], "integers separated by commas"),
        (["--kernel-size", "65"], "larger than the 64 channels"),
        (["--reduction", "8"], "--reduction applies to se, not to eca"),
    ],
)
def test_more_options_out_of_range(args, fragment, tmp_path):
    result = run("add", "eca", "resnet18", "--no-pretrained", *args, "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, fragment)
    assert not any(tmp_path.iterdir())


def test_unwritable_outputs_fail_before_work(tmp_path):
    (tmp_path / "adir.safetensors").mkdir()
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run("add-eca", "resnet18", "--no-pretrained", "-o", str(tmp_path / "adir.safetensors"),
                              "--overwrite"), "is a directory")
    assert_one_line_error(run("add-eca", "resnet18", "--no-pretrained", "-o", str(tmp_path / "afile" / "x.safetensors")),
                          "is not a folder")
    assert_one_line_error(run("demo", "weights", "-o", str(tmp_path / "w.pth")), "must be a file name ending in .safetensors")


def test_written_files_get_normal_permissions(tmp_path):
    import os

    out = tmp_path / "x.safetensors"
    assert run("add-eca", "resnet18", "--no-pretrained", "-o", str(out)).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_demo_photos_do_not_overwrite(tmp_path):
    mine = tmp_path / "chelsea.png"
    mine.write_text("mine")
    assert_one_line_error(run("demo", "photos", str(tmp_path)), "exists")
    assert mine.read_text() == "mine" and not (tmp_path / "coffee.png").exists()
    assert run("demo", "photos", str(tmp_path), "--overwrite").exit_code == 0
    assert mine.read_bytes()[:4] == b"\x89PNG"


def test_edited_recipe_is_refused(tmp_path):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "x.safetensors"
    assert run("add-se", "resnet18", "--no-pretrained", "-o", str(out)).exit_code == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    recipe = _json.loads(meta["retrofit.recipe"])
    recipe["sites"][0]["options"] = {"reduction": 8}
    meta["retrofit.recipe"] = _json.dumps(recipe)
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(out)), str(edited), metadata=meta)
    assert_one_line_error(run("predict", str(edited), str(out)), "modified after it was written")


def test_pickled_module_weights_are_refused_with_advice(tmp_path):
    import timm

    path = tmp_path / "full.pth"
    torch.save(timm.create_model("resnet18"), path)
    result = run("add-eca", "resnet18", "--weights", str(path), "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "holds pickled Python objects", "torch.save(model.state_dict(), path)")


def _png(path, side=64):
    from PIL import Image

    Image.new("RGB", (side, side), (120, 80, 40)).save(path)
    return path


def test_compare_refuses_models_with_different_classes(tmp_path):
    import retrofit

    model, _, _ = retrofit.load_model("resnet18", pretrained=False, num_classes=10)
    retrofit.add_attention(model, "eca")
    ckpt = tmp_path / "r18-10.safetensors"
    retrofit.save_checkpoint(model, ckpt)
    result = run("compare", "resnet18", str(ckpt), str(_png(tmp_path / "a.png")), "--no-pretrained")
    assert_one_line_error(result, "resnet18 has 1000 classes", "has 10: compare needs two models of the same classes")


def test_compare_refuses_same_count_other_class_names(tmp_path):
    import retrofit

    paths = []
    for names in (["cat", "dog", "fox"], ["x", "y", "z"]):
        model, _, _ = retrofit.load_model("resnet18", pretrained=False, num_classes=3)
        retrofit.add_attention(model, "eca")
        paths.append(retrofit.save_checkpoint(model, tmp_path / f"{names[0]}.safetensors",
                                              extra={"finetune": {"classes": names}}))
    result = run("compare", str(paths[0]), str(paths[1]), str(_png(tmp_path / "a.png")))
    assert_one_line_error(result, "name their classes differently")


def test_weight_options_of_predict_and_compare_name_the_option_that_cannot_apply(tmp_path, monkeypatch):
    import retrofit
    import retrofit.models as models

    model, _, _ = retrofit.load_model("resnet18", pretrained=False)
    retrofit.add_attention(model, "eca")
    ckpt = str(retrofit.save_checkpoint(model, tmp_path / "r18-eca.safetensors"))
    image, weights = str(_png(tmp_path / "a.png")), str(tmp_path / "w.pth")
    torch.save(model.state_dict(), weights)
    cases = [
        (["predict", ckpt, image, "--no-pretrained"], f"--no-pretrained applies to a model name; {ckpt} is a checkpoint"),
        (["predict", "resnet18", image, "--weights", weights, "--no-pretrained"], "--weights and --no-pretrained exclude"),
        (["compare", "resnet18", ckpt, image, "--weights", weights, "--other-weights", weights],
         "--other-weights applies to OTHER when it is a model name"),
        (["compare", ckpt, ckpt, image, "--no-pretrained"], "BASE and OTHER are both checkpoints"),
        (["compare", "resnet18", ckpt, image, "--weights", weights, "--no-pretrained"], "--weights and --no-pretrained"),
    ]
    for args, message in cases:
        assert_one_line_error(run(*args), message)
    # offline, OTHER's hint names OTHER's option
    monkeypatch.setattr(models, "_hub_reachable", lambda host: False)
    monkeypatch.setattr(models, "_hf_cached_file", lambda hub_id: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert_one_line_error(run("compare", ckpt, "resnet18", image), "pass a local file with --other-weights FILE")


def test_images_over_pil_bomb_limit_are_one_line_errors_and_large_ones_no_warning(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    from retrofit.errors import RetrofitError
    from retrofit.predict import predict

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3))
    model(torch.zeros(1, 3, 224, 224))
    image = _png(tmp_path / "big.png")  # 4,096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit: PIL warns; over twice it: PIL raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(predict(model, [image], top=2)) == 1
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(RetrofitError, match="cannot read image .*big.png.*decompression bomb"):
        predict(model, [image])


def test_bad_placement_is_reported_before_an_existing_output(tmp_path):
    out = tmp_path / "resnet18-eca.safetensors"
    out.write_bytes(b"keep")
    result = run("add-eca", "resnet18", "--no-pretrained", "--placement", "foo", "-o", str(out))
    assert_one_line_error(result, "unknown placement 'foo'")
    assert out.read_bytes() == b"keep"


def test_unreadable_weights_files_say_what_they_are(tmp_path):
    (tmp_path / "text.pth").write_text("hello")
    (tmp_path / "empty.pth").write_bytes(b"")
    out = str(tmp_path / "x.safetensors")
    assert_one_line_error(run("add-eca", "resnet18", "--weights", str(tmp_path / "text.pth"), "-o", out),
                          "not a PyTorch (torch.save) weights file, or damaged")
    assert_one_line_error(run("add-eca", "resnet18", "--weights", str(tmp_path / "empty.pth"), "-o", out),
                          "empty.pth: it is empty or truncated")


def test_weights_with_nan_are_refused(tmp_path):
    import timm

    state = timm.create_model("resnet18").state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    result = run("add-eca", "resnet18", "--weights", str(path), "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(result, "holds NaN or infinite values in 1 tensor(s) (layer2.0.conv1.weight)")
    assert not (tmp_path / "x.safetensors").exists()


def test_plain_and_crafted_pickles_are_refused_in_one_line_without_running_them(tmp_path, console_script):
    import os
    import pickle

    class Crafted:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    pickle.dump(Crafted(), open(tmp_path / "crafted.pth", "wb"), protocol=4)
    pickle.dump({"w": torch.zeros(2)}, open(tmp_path / "plain.pth", "wb"), protocol=4)
    (tmp_path / "noise.pth").write_bytes(bytes(range(7, 107)))
    for name, message in (("crafted", "nothing in it was executed"), ("plain", "nothing in it was executed"),
                          ("noise", "not a PyTorch weights file")):
        proc = console_script("add-eca", "resnet18", "--weights", tmp_path / f"{name}.pth",
                              "-o", tmp_path / "out.safetensors")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out.safetensors").exists()
