"""``bench/demo_model.py``, the command that makes the checkpoint the next demo will ship: on a
tiny run, the card describes the very file and a reload reproduces the card's numbers."""

import json
import sys
from pathlib import Path

import pytest
import torch

import oat_plugins
from oat_plugins.data import load_dataset
from oat_plugins.evaluate import evaluate

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
