"""The ``oat-plugins`` commands eval, export and demo, end to end on the bundled sample; one-line
errors for every command; the class-balanced subset behind --limit-train."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import Subset, TensorDataset

import oat_plugins
from oat_plugins.cli import COMMANDS, DEBUG_ENV, build_parser, is_user_error, main
from oat_plugins.data import balanced_subset, dataset_labels, load_dataset
from oat_plugins.evaluate import SweepResult

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
from _helpers import per_class, write_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY = {"num_classes": 10, "channels": [8, 16, 16, 16], "stem_width": 8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = oat_plugins.wrap("resnet10t", "film", model_kwargs=TINY)
    with torch.no_grad():  # FiLM off identity, so λ matters
        for name, p in model.named_parameters():
            if ".post." in name:
                p.add_(0.3 * torch.randn_like(p))
    model.train()
    with torch.no_grad():
        for lam in (0.0, 1.0):
            model.set_lambda(lam)(torch.rand(16, 3, 32, 32))
    model.set_lambda(0.0).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    oat_plugins.save(model, path)
    return path


def _bundled_test(n):
    data = load_dataset("bundled", "test")
    x = torch.stack([data[i][0] for i in range(n)])
    y = torch.tensor([data[i][1] for i in range(n)])
    return x, y


def test_every_command_has_help(capsys):
    assert {"eval", "export", "demo"} <= set(COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    for name in COMMANDS:
        assert name in top
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"oat-plugins {name}" in capsys.readouterr().out


def test_export_writes_a_weights_only_plain_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "plain.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--lambda", "0.4",
                 "--out", str(out)]) == 0
    assert "λ=0.4" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["lam"] == 0.4 and payload["backbone"]["name"] == "resnet10t"
    plain = oat_plugins.load_exported(out)
    assert oat_plugins.exported.exported_lambda(out) == 0.4
    assert not any(type(m).__module__.startswith("oat_plugins") for m in plain.modules())
    n_backbone = sum(p.numel() for p in timm.create_model("resnet10t", **TINY).parameters())
    assert sum(p.numel() for p in plain.parameters()) == n_backbone
    model = oat_plugins.load(checkpoint).eval()
    x, _ = _bundled_test(8)
    with torch.no_grad(), oat_plugins.condition(model, 0.4):
        expected = model(x)
    with torch.no_grad():
        assert torch.allclose(plain(x), expected, atol=1e-4)
        with oat_plugins.condition(model, 1.0):
            assert not torch.allclose(plain(x), model(x), atol=1e-4)


def test_export_and_eval_at_a_lower_density(tmp_path, capsys):
    """--density sets the masked model's density knob before exporting or evaluating."""
    torch.manual_seed(0)
    model = oat_plugins.wrap("resnet10t", "floats", model_kwargs=TINY).eval()
    oat_plugins.save(model, tmp_path / "floats.pt")
    assert main(["export", "--checkpoint", str(tmp_path / "floats.pt"), "--lambda", "0.5",
                 "--density", "0.25", "--out", str(tmp_path / "plain.pt")]) == 0
    plain = oat_plugins.load_exported(tmp_path / "plain.pt")
    convs = [m.weight for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    kept = sum(int((w != 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert abs(kept - 0.25) <= 0.01
    x, _ = _bundled_test(4)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.set_density(0.25).export(0.5)(x))
    assert main(["eval", "--checkpoint", str(tmp_path / "floats.pt"), "--data", "bundled",
                 "--lambdas", "0.5", "--attack", "fgsm", "--n-examples", "8", "--density",
                 "0.25", "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "floats.pt"), "--data", "bundled",
                 "--density", "0.6", "--out", str(tmp_path / "eval2"), "--no-progress"]) == 2
    assert "above the trained density 0.5" in capsys.readouterr().err


def test_export_errors(checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--lambda", "0.5",
                 "--out", str(tmp_path / "x.pt")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(checkpoint), "--lambda", "1.5", "--out", "x.pt"])
    assert exit_info.value.code == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_eval_end_to_end_on_the_bundled_sample(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(checkpoint), "--data", "bundled",
                 "--lambdas", "0,0.5,1", "--attack", "pgd", "--steps", "1", "--eps", "4/255",
                 "--n-examples", "12", "--batch-size", "6", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| λ | clean acc (%)" in printed and "PGD-1 (L∞, ε=4/255" in printed
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [0.0, 0.5, 1.0]
    assert all(r.n == 12 and 0 <= r.robust_acc <= r.clean_acc <= 1 for r in result)
    assert (out / "metrics.csv").read_text().count("\n") == 4
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    # The CLI measures what the library measures on the same first 12 test images.
    model = oat_plugins.load(checkpoint).eval()
    x, y = _bundled_test(12)
    with torch.no_grad(), oat_plugins.condition(model, 0.5):
        clean = float((model(x).argmax(1) == y).float().mean())
    assert result.row(0.5).clean_acc == pytest.approx(clean)
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    assert meta["data"] == "bundled" and meta["steps"] == 1
    assert meta["eps"] == pytest.approx(4 / 255)


def test_eval_of_an_exported_model_has_one_row(checkpoint, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--lambda", "1",
                 "--out", str(plain)]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(plain), "--attack", "fgsm", "--n-examples", "8",
                 "--out", str(out), "--no-progress"]) == 0
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [None]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(plain), "--lambdas", "0,1", "--n-examples", "8",
                 "--out", str(out)]) == 2
    assert "drop --lambdas" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [(["--lambdas", "0,2"], "must be in [0, 1]"), (["--lambdas", "0,,1"], "comma-separated"),
     (["--lambdas", "a"], "not a number"), (["--attack", "pgd7"], "invalid choice"),
     (["--n-examples", "0"], "positive integer"), (["--eps", "8/0"], "8/255"),
     (["--eps", "-1"], "positive number")],
)
def test_eval_rejects_bad_arguments(checkpoint, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["eval", "--checkpoint", str(checkpoint), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_errors_for_missing_checkpoint_and_unknown_data(checkpoint, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--out",
                 str(tmp_path)]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", "imagenet7",
                 "--out", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err


def test_demo_end_to_end_with_tiny_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--from-scratch", "--model-kwargs", json.dumps(TINY), "--epochs", "1",
                 "--max-steps", "2", "--batch-size", "32", "--lambdas", "0,1",
                 "--steps", "1", "--n-examples", "16", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| λ | clean acc (%)" in printed and "conditioned with 'film'" in printed
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [0.0, 1.0]
    assert all(r.n == 16 and 0 <= r.robust_acc <= r.clean_acc <= 1 for r in result)
    assert (out / "tradeoff.png").is_file()
    assert (out / "metrics.csv").read_text().startswith("lam,clean_acc,robust_acc")
    assert (out / "train" / "last.pt").is_file()
    model = oat_plugins.load(out / "model.pt")
    assert model.method_name == "film" and model.backbone_spec["kwargs"]["stem_width"] == 8
    # The training checkpoint next to it feeds eval and export directly.
    assert main(["eval", "--checkpoint", str(out / "train" / "last.pt"), "--lambdas", "1",
                 "--attack", "fgsm", "--n-examples", "16", "--out", str(out / "eval"),
                 "--no-progress"]) == 0
    again = SweepResult.from_json(out / "eval" / "metrics.json")
    assert again.rows[0].clean_acc == result.row(1.0).clean_acc
    assert main(["export", "--checkpoint", str(out / "train" / "last.pt"), "--lambda", "0",
                 "--out", str(out / "plain.pt")]) == 0
    assert oat_plugins.exported.exported_lambda(out / "plain.pt") == 0.0


# -- errors: one line on stderr, exit status 2 ----------------------------------------------

def _error_line(argv: list[str], capsys) -> str:
    """Run the CLI; assert it failed with status 2 and exactly one stderr line; return it."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse rejects the arguments
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "not_a_model_xyz", "--method", "film", "--eval-samples", "0"],
     "Unknown model (not_a_model_xyz)"),
    (["train", "--model", "resnet10t", "--method", "not_a_method", "--eval-samples", "0"],
     "unknown method"),
    (["train", "--model", "resnet10t", "--method", "film", "--lambdas", "0,1.5"],
     "must be in [0, 1]"),
    (["eval", "--checkpoint", "{tmp}/missing.pt"], "no checkpoint file"),
    (["eval", "--checkpoint", "{tmp}/garbage.pt"], "not a readable checkpoint"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/no-such-folder"], "does not exist"),
    (["export", "--checkpoint", "{ckpt}", "--lambda", "1.5", "--out", "{tmp}/x.pt"],
     "expected a number in [0, 1]"),
    (["eval", "--checkpoint", "{ckpt}", "--density", "0.5"], "has no density knob"),
    (["benchmark", "--checkpoint", "{ckpt}", "--lambdas", "0,2"], "must be in [0, 1]"),
    (["benchmark", "--checkpoint", "{tmp}/missing.pt", "--lambdas", "0.5"], "does not exist"),
    (["gdws", "--checkpoint", "{tmp}/missing.pt", "--lambda", "1", "--budget", "0.5",
      "--out", "{tmp}/g.pt"],
     "missing.pt"),
    (["info", "--checkpoint", "{tmp}/garbage.pt"], "not a readable checkpoint"),
    (["leaderboard", "--results", "{tmp}/missing"], "does not exist"),
    (["not-a-command"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, checkpoint, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run"), "--no-progress"]
    line = _error_line(argv, capsys)
    prog = "oat-plugins" if argv[0] == "not-a-command" else f"oat-plugins {argv[0]}"
    assert line.startswith(f"{prog}: error: ")
    assert message in line


def test_unknown_model_in_a_real_process_prints_no_traceback(tmp_path):
    """The issue's reproduction, as a user runs it: the whole stderr is one line."""
    done = subprocess.run(
        [sys.executable, "-m", "oat_plugins.cli", "train", "--model", "not_a_model_xyz",
         "--method", "film", "--eval-samples", "0", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO),
                                                          DEBUG_ENV: ""})
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "oat-plugins train: error: Unknown model (not_a_model_xyz)"]


def test_debug_flag_and_environment_show_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["eval", "--checkpoint", str(tmp_path / "missing.pt")]
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        main(["--debug", *argv])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        main(argv)
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert "no checkpoint file" in _error_line(argv, capsys)


def test_only_user_errors_are_shortened():
    assert is_user_error(ValueError("bad λ")) and is_user_error(TypeError("not a model"))
    assert is_user_error(FileNotFoundError("x.pt")) and is_user_error(PermissionError("out"))
    assert is_user_error(RuntimeError("Unknown model (resnet999)"))  # timm's wording
    # bugs keep their traceback
    assert not is_user_error(RuntimeError("CUDA error: an illegal memory access"))
    assert not is_user_error(KeyError("state_dict"))
    assert not is_user_error(AttributeError("'NoneType' object has no attribute 'lam'"))


# -- --limit-train / --eval-samples: a seeded class-balanced subset -------------------------

def _counts(dataset) -> Counter:
    return Counter(dataset_labels(dataset).tolist())


def test_balanced_subset_of_a_class_sorted_image_folder(tmp_path):
    images, labels = per_class(6)  # written class by class: an ImageFolder sorted by class
    folder = write_image_folder(tmp_path / "folder", images, labels)
    data = load_dataset(folder, "train", augment=False)
    assert data.targets == sorted(data.targets)  # the first 20 would be 4 classes only
    for n in (20, 23):
        subset = balanced_subset(data, n, seed=0)
        counts = _counts(subset)
        assert len(subset) == n and sorted(counts) == list(range(10))
        assert max(counts.values()) - min(counts.values()) <= 1
        # the labels it read cheaply are the images' own
        assert [subset[i][1] for i in range(n)] == dataset_labels(subset).tolist()
    first = balanced_subset(data, 20, seed=0).indices
    assert balanced_subset(data, 20, seed=0).indices == first  # reproducible
    assert balanced_subset(data, 20, seed=1).indices != first  # and drawn with the seed
    assert balanced_subset(data, 60, seed=0) is data  # the whole dataset: unchanged


def test_balanced_subset_reads_labels_of_any_dataset():
    # no targets/labels attribute: read item by item; a class with too few items gives all
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    plain = TensorDataset(torch.zeros(22, 1), labels)
    subset = balanced_subset(plain, 12, seed=3)
    assert _counts(subset) == {0: 2, 1: 5, 2: 5}
    nested = balanced_subset(Subset(load_dataset("bundled", "test"), range(200)), 50, seed=0)
    assert set(_counts(nested).values()) == {5}
    with pytest.raises(ValueError, match="positive integer"):
        balanced_subset(plain, 0)
