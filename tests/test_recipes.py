"""Every recipe of examples/recipes/ through the real ``oat-plugins train --config``, shrunk to
a smoke run by command-line flags (which override the file): a tiny backbone where the recipe
names a big one, a few bundled images, one epoch. The RobustBench recipe runs on a zoo
architecture (RobustBench's PreActResNet-18 of Wong2020Fast) with random weights written where
``robustbench.utils.load_model`` looks first, so nothing is downloaded."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import oat_plugins
from oat_plugins.cli import main
from oat_plugins.evaluate import SweepResult
from oat_plugins.robustbench import compat

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "examples" / "recipes").glob("*.yaml"))
TINY = ["--model", "resnet10t", "--model-kwargs",
        json.dumps({"channels": [8, 16, 16, 16], "stem_width": 8})]
SMOKE = ["--data", "bundled", "--limit-train", "32", "--batch-size", "16", "--epochs", "1",
         "--steps", "1", "--eval-samples", "8", "--final-steps", "1",
         "--final-lambdas", "0,1", "--calibration-samples", "40", "--no-progress"]


def _zoo_checkpoint(root: Path, name: str = "Wong2020Fast") -> None:
    """A local checkpoint of a RobustBench zoo architecture (random weights)."""
    compat.install()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    model = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][name]["model"]()
    (root / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(model.state_dict(), root / "cifar10" / "Linf" / f"{name}.pt")


def test_every_recipe_is_listed_with_expected_numbers():
    assert len(RECIPES) >= 6
    listing = (REPO / "docs" / "recipes.md").read_text()
    for recipe in RECIPES:
        header = recipe.read_text().split("\nmodel:")[0]
        assert "Expected" in header, recipe.name
        assert recipe.name in listing, recipe.name
        assert yaml.safe_load(recipe.read_text())["method"], recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke_run(recipe, tmp_path):
    config = yaml.safe_load(recipe.read_text())
    argv = ["train", "--config", str(recipe), *SMOKE, "--out", str(tmp_path / "run")]
    if str(config["model"]).startswith("robustbench:"):
        _zoo_checkpoint(tmp_path / "zoo")
        argv += ["--model", "robustbench:Wong2020Fast", "--robustbench-dir",
                 str(tmp_path / "zoo")]
    else:
        argv += TINY + ["--no-pretrained"]
    assert main(argv) == 0
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert saved["method"] == config["method"]
    for key, value in config.get("option", {}).items():
        assert saved["options"][key] == value, key
    if "lambdas" in config and "lambdas" in saved["options"]:
        assert list(saved["options"]["lambdas"]) == [float(v) for v in config["lambdas"]]
    table = SweepResult.from_json(tmp_path / "run" / "tradeoff.json")
    assert table.lambdas == [0.0, 1.0] and table.rows[0].n == 8
    history = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["epoch"] == 1


def test_config_flags_override_file_and_unknown_keys_are_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet10t\nmethod: film\nepochs: 7\nlr: 0.5\n"
                      f"out: {tmp_path / 'from-file'}\n")
    assert main(["train", "--config", str(recipe), "--lr", "0.01", "--out",
                 str(tmp_path / "run"), *TINY, *SMOKE]) == 0
    assert not (tmp_path / "from-file").exists()
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert checkpoint["config"]["epochs"] == 1 and checkpoint["config"]["lr"] == 0.01
    recipe.write_text("model: resnet10t\nmethod: film\nepochz: 7\n")
    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown key(s) epochz; allowed:" in err
    recipe.write_text("- just a list\n")
    assert main(["train", "--config", str(recipe)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def _wide_resnet() -> torch.nn.Module:
    """RobustBench's WideResNet class (the zoo's WRN-28-10 and kin), at depth 10, width 1."""
    compat.install()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    return WideResNet(depth=10, widen_factor=1)


def _zoo_model(tmp_path: Path) -> torch.nn.Module:
    """Wong2020Fast's PreActResNet-18 as robustbench.utils.load_model returns it."""
    _zoo_checkpoint(tmp_path)
    from robustbench.utils import load_model

    return load_model("Wong2020Fast", model_dir=tmp_path, dataset="cifar10", threat_model="Linf")


@pytest.mark.parametrize("build", [_zoo_model, lambda _: _wide_resnet()],
                         ids=["load_model-Wong2020Fast", "WideResNet-10-1"])
def test_wrapped_zoo_model_keeps_its_function(build, tmp_path):
    """Before any training, both ends of a wrapped zoo model are the zoo model."""
    torch.manual_seed(0)
    zoo = build(tmp_path).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = zoo(x)
        model = oat_plugins.wrap(zoo, "film", normalize=None).eval()
        for lam in (0.0, 1.0):
            with model.at(lam):
                assert torch.allclose(model(x), expected, atol=1e-4)


def test_unknown_zoo_model_is_one_line(tmp_path, capsys):
    assert main(["train", "--model", "robustbench:NoSuchModel2099", "--method", "film",
                 "--data", "bundled", "--robustbench-dir", str(tmp_path), "--eval-samples", "0",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("oat-plugins train: error: 'NoSuchModel2099' is not in RobustBench's cifar10 "
                   "Linf model zoo")
