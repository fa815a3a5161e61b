"""The timm-native export: a folder that plain timm loads with no oat_plugins import."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import oat_plugins
from oat_plugins.cli import main
from oat_plugins.layers import DualNorm

NARROW = {"num_classes": 10, "channels": [8, 16, 16, 16], "stem_width": 8}
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # not timm's default
VIT = {"img_size": 32, "patch_size": 8, "depth": 1, "num_classes": 10}

# What docs/export.md tells users to run, plus the comparison: a fresh interpreter whose path
# holds neither the repository nor the test directory.
LOAD_WITH_PLAIN_TIMM = """
import json, sys
import timm, torch
from timm.data import resolve_data_config

folder, x_path, out_path = sys.argv[1:4]
config = json.load(open(f"{folder}/config.json"))
model = timm.create_model(
    config["architecture"], num_classes=config["num_classes"], **config["model_args"],
    pretrained=True,
    pretrained_cfg_overlay=dict(config["pretrained_cfg"], file=f"{folder}/model.safetensors"),
).eval()
data = resolve_data_config(model=model)
mean = torch.tensor(data["mean"]).view(1, -1, 1, 1)
std = torch.tensor(data["std"]).view(1, -1, 1, 1)
x = torch.load(x_path, weights_only=True)
with torch.no_grad():
    logits = model((x - mean) / std)
assert "oat_plugins" not in sys.modules
torch.save({"logits": logits, "input_size": list(data["input_size"]),
            "crop_pct": data["crop_pct"]}, out_path)
"""


def perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for dual in (m for m in model.modules() if isinstance(m, DualNorm)):
            for p in dual.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def load_with_plain_timm(folder, x, tmp_path):
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_PLAIN_TIMM, str(folder), str(tmp_path / "x.pt"),
         str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.mark.parametrize(
    "make, image_size",
    [
        (lambda: oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW,
                                  normalize=CIFAR10), 32),
        # a ViT taking [0, 1] inputs as they are: the config must not normalise
        (lambda: oat_plugins.wrap("vit_tiny_patch16_224", "film", normalize=None,
                                  model_kwargs=VIT), None),
    ],
    ids=["resnet-normalised", "vit-unnormalised"],
)
def test_plain_timm_loads_the_folder(tmp_path, make, image_size):
    model = perturbed(make())
    lam = 0.3
    oat_plugins.save_exported(model, lam, tmp_path / "export", format="safetensors",
                              image_size=image_size)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == [
        "config.json", "model.safetensors"]
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    result = load_with_plain_timm(tmp_path / "export", x, tmp_path)
    with torch.no_grad():
        expected = model.export(lam)(x)
        assert not torch.allclose(model.export(1.0)(x), expected, atol=1e-3)  # λ matters
    assert torch.allclose(result["logits"], expected, atol=1e-5)
    assert result["input_size"] == [3, 32, 32] and result["crop_pct"] == 1.0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["oat_plugins"]["lambda"] == lam and config["oat_plugins"]["method"] == "film"


def test_folder_of_a_module_built_with_unrecorded_kwargs_is_refused(tmp_path):
    backbone = timm.create_model("resnet10t", act_layer="gelu", **NARROW)
    model = oat_plugins.wrap(backbone, "film", model_kwargs=NARROW)
    with pytest.raises(ValueError, match="model_kwargs"):
        oat_plugins.save_exported(model, 0.5, tmp_path / "export", format="safetensors")
    assert not (tmp_path / "export").exists()


def test_reset_classifier_pool_reaches_model_args(tmp_path):
    model = oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW)
    model.reset_classifier(4, global_pool="max")
    oat_plugins.save_exported(model, 0.5, tmp_path / "export", format="safetensors")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["num_classes"] == 4 and config["model_args"]["global_pool"] == "max"


def test_export_command_writes_the_folder(tmp_path, capsys):
    model = perturbed(oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW))
    oat_plugins.save(model, tmp_path / "model.pt")
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--format {oat,safetensors}" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--lambda", "0.5",
                 "--format", "safetensors", "--image-size", "32",
                 "--out", str(tmp_path / "folder")]) == 0
    assert "timm.create_model" in capsys.readouterr().out
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert main(["export", "--checkpoint", str(tmp_path / "model.pt"), "--lambda", "0.5",
                 "--image-size", "32", "--out", str(tmp_path / "m.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err
