"""``oat-plugins demo`` on a tiny checkpoint made by the real ``bench/demo_model.py``: the card
describes the very file, a reload reproduces the card's numbers, and the demo sweeps, plots,
exports and fine-tunes it; a file its card does not describe is refused."""

import json
import sys
from pathlib import Path

import pytest
import torch

import oat_plugins
from oat_plugins.cli import main
from oat_plugins.data import load_dataset
from oat_plugins.evaluate import SweepResult, evaluate

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


def test_demo_sweeps_exports_and_finetunes(tiny_demo_model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--checkpoint", str(tiny_demo_model), "--lambdas", "0,0.5,1",
                 "--steps", "1", "--n-examples", "16", "--finetune-steps", "1",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "where it came from" in printed and "python bench/demo_model.py" in printed
    assert "| λ | clean acc (%)" in printed and "dial:" in printed
    assert "a plain timm.models.resnet.ResNet" in printed
    assert "clean before → after" in printed
    result = SweepResult.from_json(out / "metrics.json")
    assert result.lambdas == [0.0, 0.5, 1.0] and all(r.n == 16 for r in result)
    assert (out / "tradeoff.png").is_file() and (out / "model.pt").is_file()
    plain = oat_plugins.load_exported(out / "model_lam0.6.pt")
    with torch.no_grad():
        assert sum(p.numel() for p in plain.parameters()) < \
            sum(p.numel() for p in oat_plugins.load(tiny_demo_model).parameters())
    assert oat_plugins.load(out / "finetune" / "model.pt").method_name == "film"


def test_demo_refuses_a_file_its_card_does_not_describe(tiny_demo_model, tmp_path, capsys):
    other = tmp_path / "demo_model.pt"
    model = oat_plugins.load(tiny_demo_model)
    oat_plugins.save(model, other)  # same model, stored in float32: another file
    (tmp_path / "demo_model.json").write_text(tiny_demo_model.with_suffix(".json").read_text())
    assert main(["demo", "--checkpoint", str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not the file its card demo_model.json describes" in err
    assert main(["demo", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "make it with: python bench/demo_model.py --install" in capsys.readouterr().err
