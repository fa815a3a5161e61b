"""The demo: ``bench/demo_model.py`` (the command that makes the shipped checkpoint; on a tiny
run, the card describes the very file and a reload reproduces the card's numbers),
``oat-plugins demo`` on a model it is given, and the model the package ships."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import oat_plugins
from oat_plugins._io import file_sha256
from oat_plugins.cli import main
from oat_plugins.cli.demo import SHIPPED_MODEL, load_shipped
from oat_plugins.data import load_dataset
from oat_plugins.evaluate import SweepResult, evaluate
from oat_plugins.exported import load_exported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import demo_model  # noqa: E402

TINY = {"channels": [8, 16, 16, 16], "stem_width": 8}


@pytest.fixture(scope="module")
def tiny_demo_model(tmp_path_factory):
    """A demo model + card written by bench/demo_model.py (two training steps)."""
    out = tmp_path_factory.mktemp("demo_model")
    assert demo_model.main([
        "--data", "bundled", "--model-kwargs", json.dumps(TINY), "--epochs", "1",
        "--max-steps", "2", "--lambdas", "0,0.5,1", "--steps", "1", "--n-examples", "24",
        "--out", str(out), "--no-progress"]) == 0
    return out / demo_model.MODEL_FILE


def test_card_describes_the_file_and_a_reload_reproduces_its_numbers(tiny_demo_model):
    card = json.loads(tiny_demo_model.with_suffix(".json").read_text())
    assert card["command"].startswith("python bench/demo_model.py --data bundled")
    assert card["file"]["parameter_dtype"] == "float16"
    assert card["file"]["max_relative_logit_error"] <= demo_model.REPRODUCE_TOLERANCE
    stored = torch.load(tiny_demo_model, weights_only=True)["state_dict"]
    assert stored["backbone.conv1.0.weight"].dtype == torch.float16
    assert any(k.endswith("lambdas") and v.dtype == torch.float32 for k, v in stored.items())
    model = oat_plugins.load(tiny_demo_model)
    assert next(model.parameters()).dtype == torch.float32
    again = evaluate(model, load_dataset("bundled", "test"), [0, 0.5, 1], attack="pgd",
                     steps=1, n_examples=24, subset_seed=0, seed=0, progress=False)
    assert [(r.clean_acc, r.robust_acc) for r in again] == \
        [(r["clean_acc"], r["robust_acc"]) for r in card["rows"]]


# -- `oat-plugins demo` on a shipped model ------------------------------------------------------

def _demo_argv(model_file: Path, out: Path) -> list[str]:
    return ["demo", "--model-file", str(model_file), "--lambdas", "0,1", "--steps", "1",
            "--n-examples", "16", "--finetune-steps", "2", "--out", str(out), "--no-progress"]


def test_demo_sweeps_exports_and_finetunes_the_model_it_is_given(tiny_demo_model, tmp_path,
                                                                 capsys):
    out = tmp_path / "run"
    assert main(_demo_argv(tiny_demo_model, out)) == 0
    printed = capsys.readouterr().out
    assert "python bench/demo_model.py --data bundled" in printed  # where the model came from
    assert "| λ | clean acc (%)" in printed and "export(λ = 0.5): a plain" in printed
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [0.0, 1.0] and all(r.n == 16 for r in result)
    assert result.meta["card"]["file"]["sha256"] == file_sha256(tiny_demo_model)
    shipped, saved = oat_plugins.load(tiny_demo_model), oat_plugins.load(out / "model.pt")
    x = load_dataset("bundled", "test")[0][0][None]
    with torch.no_grad(), shipped.at(0.5), saved.at(0.5):
        assert torch.equal(shipped(x), saved(x))
        assert torch.allclose(load_exported(out / "model_lam0.5.pt")(x), shipped(x), atol=1e-5)
    # the fine-tuning run changed the weights it started from and left its checkpoint
    tuned = oat_plugins.load(out / "finetune" / "last.pt")
    assert not torch.equal(tuned.state_dict()["backbone.fc.weight"],
                           saved.state_dict()["backbone.fc.weight"])


def test_demo_refuses_a_model_file_its_card_does_not_describe(tiny_demo_model, tmp_path,
                                                             capsys):
    copy = tmp_path / tiny_demo_model.name
    shutil.copyfile(tiny_demo_model.with_suffix(".json"), copy.with_suffix(".json"))
    model = oat_plugins.load(tiny_demo_model)
    with torch.no_grad():
        model.backbone.fc.weight.add_(0.01)
    oat_plugins.save(model, copy)
    assert main(_demo_argv(copy, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its card" in err[0]
    assert main(_demo_argv(tmp_path / "none.pt", tmp_path / "run")) == 2
    assert "no demo model at" in capsys.readouterr().err


# -- the model the package ships --------------------------------------------------------------

def test_the_shipped_model_is_the_file_its_card_describes():
    card = json.loads(SHIPPED_MODEL.with_suffix(".json").read_text())
    assert card["command"].startswith("python bench/demo_model.py")
    assert card["file"]["sha256"] == file_sha256(SHIPPED_MODEL)
    assert SHIPPED_MODEL.stat().st_size == card["file"]["bytes"] <= 5 * 2**20


def test_the_shipped_model_trades_clean_for_robust_accuracy_on_held_out_images():
    """On bundled CIFAR-10 test images (never trained on), λ = 1 is more robust and λ = 0
    more accurate on clean images: the shipped model is a trade-off, not one model twice."""
    model, _ = load_shipped(SHIPPED_MODEL)
    rows = evaluate(model, load_dataset("bundled", "test"), [0, 1], attack="pgd", steps=5,
                    n_examples=300, subset_seed=0, seed=0, progress=False)
    at0, at1 = rows.row(0.0), rows.row(1.0)
    assert at0.clean_acc > at1.clean_acc + 0.03
    assert at1.robust_acc > at0.robust_acc + 0.05


def test_demo_refuses_a_negative_number_of_finetuning_steps(tiny_demo_model, tmp_path, capsys):
    argv = _demo_argv(tiny_demo_model, tmp_path / "run")
    argv[argv.index("--finetune-steps") + 1] = "-1"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--finetune-steps must be >= 0" in err[0]
