"""Model files: save/load round trips are exact or refused, every format shares one header and
one timm spec, old files still load, and load honours map_location."""

import argparse

import pytest
import timm
import torch
from torch import nn

import oat_plugins
from oat_plugins import checkpoint
from oat_plugins.exported import load_exported, save_exported
from oat_plugins.gdws import GDWSConv2d, convert, load_converted, save_converted
from oat_plugins.layers import DualNorm

# The narrow resnet10t of bench/tradeoff.py (its --model-kwargs default), at test size.
NARROW = {"num_classes": 10, "channels": [8, 16, 16, 16], "stem_width": 8}


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def large():
    """Images whose resnet feature map is larger than 1x1, so that max and average pooling
    differ."""
    return torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def perturbed(model: oat_plugins.ConditionalModel) -> oat_plugins.ConditionalModel:
    """Move every dual norm off its initialisation so that λ and the branches matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for dual in (m for m in model.modules() if isinstance(m, DualNorm)):
            for p in dual.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def outputs(model: nn.Module, x: torch.Tensor, lam: float = 0.5) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, oat_plugins.ConditionalModel):
            with oat_plugins.condition(model, lam):
                return model(x)
        return model.eval()(x)


def round_trip(model, tmp_path, **load_kwargs):
    path = tmp_path / "m.pt"
    oat_plugins.save(model, path)
    return oat_plugins.load(path, **load_kwargs)


# -- issue 10.5: kwargs that leave the state dict unchanged ------------------------------------
def test_plain_round_trip_is_exact(tmp_path, images):
    model = perturbed(oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW))
    loaded = round_trip(model, tmp_path)
    assert torch.equal(outputs(loaded, images), outputs(model, images))
    assert loaded.backbone_spec == model.backbone_spec


def test_pretrained_in_model_kwargs_does_not_break_load(tmp_path, images):
    model = perturbed(oat_plugins.wrap("resnet10t", "film",
                                       model_kwargs={**NARROW, "pretrained": False}))
    loaded = round_trip(model, tmp_path)
    assert torch.equal(outputs(loaded, images), outputs(model, images))


def test_act_layer_of_a_built_module_is_refused_with_what_to_pass(tmp_path, images):
    """The built module's act_layer leaves no trace in the state dict or in model_kwargs."""
    backbone = timm.create_model("resnet10t", act_layer="gelu", **NARROW)
    model = perturbed(oat_plugins.wrap(backbone, "film", model_kwargs=NARROW))
    path = tmp_path / "m.pt"
    oat_plugins.save(model, path)
    with pytest.raises(ValueError, match="model_kwargs=") as err:
        oat_plugins.load(path)
    assert "backbone=" in str(err.value) and "GELU" in str(err.value)
    # Either way of naming the architecture gives the exact model back.
    for kwargs in ({"model_kwargs": {"act_layer": "gelu"}},
                   {"backbone": timm.create_model("resnet10t", act_layer="gelu", **NARROW)}):
        loaded = oat_plugins.load(path, **kwargs)
        assert torch.equal(outputs(loaded, images), outputs(model, images))
    # A wrong explicit backbone is refused too, not silently used.
    with pytest.raises(ValueError, match="architecture"):
        oat_plugins.load(path, backbone=timm.create_model("resnet10t", **NARROW))


def test_act_layer_in_model_kwargs_round_trips_exactly(tmp_path, images):
    kwargs = {**NARROW, "act_layer": "gelu"}
    model = perturbed(oat_plugins.wrap(timm.create_model("resnet10t", **kwargs), "film",
                                       model_kwargs=kwargs))
    loaded = round_trip(model, tmp_path)
    assert any(type(m).__name__ == "GELU" for m in loaded.modules())
    assert torch.equal(outputs(loaded, images), outputs(model, images))


def test_global_pool_of_a_built_module_is_refused(tmp_path, large):
    backbone = timm.create_model("resnet10t", global_pool="max", **NARROW)
    model = perturbed(oat_plugins.wrap(backbone, "film", model_kwargs=NARROW))
    with pytest.raises(ValueError, match="model_kwargs=") as err:
        round_trip(model, tmp_path)
    assert "max" in str(err.value)
    loaded = oat_plugins.load(tmp_path / "m.pt", model_kwargs={"global_pool": "max"})
    assert torch.equal(outputs(loaded, large), outputs(model, large))


def test_vit_string_global_pool_is_checked(tmp_path):
    """A ViT keeps global_pool as a string attribute, outside its repr (with fc_norm fixed, the
    repr of an 'avg' and a 'token' ViT is the same)."""
    kwargs = {"depth": 1, "fc_norm": False}
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10,
                            global_pool="avg", **kwargs)
    model = oat_plugins.wrap(vit, "film", model_kwargs=kwargs)
    with pytest.raises(ValueError, match="global_pool"):
        round_trip(model, tmp_path)


def test_reset_classifier_with_global_pool_round_trips_exactly(tmp_path, large):
    model = perturbed(oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW))
    model.reset_classifier(3, global_pool="max")
    with torch.no_grad():
        model.get_classifier().weight.normal_()
    loaded = round_trip(model, tmp_path)
    assert isinstance(loaded.backbone.global_pool.pool, nn.AdaptiveMaxPool2d)
    assert torch.equal(outputs(loaded, large), outputs(model, large))
    assert loaded.backbone_spec == model.backbone_spec  # the reset is recorded once, not twice
    # The exported model replays the same head.
    save_exported(model, 0.5, tmp_path / "plain.pt")
    assert torch.allclose(outputs(load_exported(tmp_path / "plain.pt"), large),
                          outputs(model, large), atol=1e-5)


def test_exported_file_with_a_built_module_is_refused(tmp_path):
    model = oat_plugins.wrap(timm.create_model("resnet10t", act_layer="gelu", **NARROW), "film",
                             model_kwargs=NARROW)
    save_exported(model, 0.5, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="model_kwargs="):
        load_exported(tmp_path / "plain.pt")
    assert any(type(m).__name__ == "GELU" for m in load_exported(
        tmp_path / "plain.pt", model_kwargs={"act_layer": "gelu"}).modules())


def test_vit_spec_keeps_img_and_patch_size():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                            num_classes=10)
    spec = checkpoint.timm_spec(vit, {"depth": 1})
    # square sizes as the ints ViT's constructor defaults to (NesT needs them so)
    assert spec["kwargs"]["img_size"] == 32 and spec["kwargs"]["patch_size"] == 8
    rebuilt = checkpoint.build_backbone(spec, source="spec")
    assert rebuilt.state_dict().keys() == vit.state_dict().keys()


# -- files of the previous version ---------------------------------------------------------------
def _as_version_1(payload: dict) -> dict:
    """What oat-plugins wrote before the architecture check: format_version 1, no
    architecture text, no recorded classifier resets."""
    spec = {"name": payload["backbone"]["name"], "kwargs": payload["backbone"]["kwargs"]}
    old = {k: v for k, v in payload.items() if k != "timm_version"}
    return {**old, "format_version": 1, "backbone": spec}


def test_version_1_files_still_load(tmp_path, images):
    model = perturbed(oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW))
    torch.save(_as_version_1(checkpoint.to_checkpoint(model)), tmp_path / "v1.pt")
    assert torch.equal(outputs(oat_plugins.load(tmp_path / "v1.pt"), images),
                       outputs(model, images))
    from oat_plugins.exported import exported_payload

    torch.save(_as_version_1(exported_payload(model, 0.5)), tmp_path / "v1_plain.pt")
    assert torch.allclose(outputs(load_exported(tmp_path / "v1_plain.pt"), images),
                          outputs(model, images), atol=1e-5)  # folded at λ: float rounding


def test_newer_version_is_refused_naming_it(tmp_path):
    payload = checkpoint.to_checkpoint(oat_plugins.wrap("resnet10t", "film",
                                                        model_kwargs=NARROW))
    torch.save({**payload, "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(ValueError, match="format 99, newer"):
        oat_plugins.load(tmp_path / "new.pt")


def test_every_format_shares_one_header(tmp_path):
    model = oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW)
    save_exported(model, 0.5, tmp_path / "plain.pt")
    oat_plugins.save(model, tmp_path / "cond.pt")
    new, _ = convert(model.export(0.5), budget=0.5)
    save_converted(new, tmp_path / "gdws.pt", spec=model.backbone_spec)
    keys = {"format", "format_version", "oat_plugins_version", "timm_version", "backbone",
            "normalize", "method"}
    specs = []
    for name in ("cond.pt", "plain.pt", "gdws.pt"):
        payload = torch.load(tmp_path / name, weights_only=True)
        assert keys <= payload.keys()
        specs.append(payload["backbone"])
    assert specs[0] == specs[1] == specs[2] == model.backbone_spec


# -- issue 10.6: GDWS output of a backbone with non-default kwargs ------------------------------
def test_cli_gdws_output_of_a_narrow_backbone_reloads(tmp_path, images):
    from oat_plugins.cli import gdws as cli_gdws

    cond = perturbed(oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW))
    oat_plugins.save(cond, tmp_path / "cond.pt")
    parser = argparse.ArgumentParser(prog="oat-plugins")
    cli_gdws.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "gdws.pt"
    args = parser.parse_args(["gdws", "--checkpoint", str(tmp_path / "cond.pt"), "--lambda",
                              "0.5", "--budget", "0.5", "--out", str(out)])
    assert args.func(args) == 0
    model = load_converted(out)
    ref, _ = convert(cond.export(0.5), budget=0.5)
    assert any(isinstance(m, GDWSConv2d) for m in model.modules())
    assert torch.equal(outputs(model, images), outputs(ref, images))


def test_legacy_gdws_file_still_loads(tmp_path, images):
    backbone = timm.create_model("resnet10t", **NARROW).eval()
    new, _ = convert(backbone, budget=0.5)
    layers = {n: m.config() for n, m in new.named_modules() if isinstance(m, GDWSConv2d)}
    torch.save({"format": "oat_plugins.gdws.converted/1",
                "source": {"arch": "resnet10t", "kwargs": NARROW, "normalize": None},
                "gdws_layers": layers, "state_dict": new.state_dict(), "extra": {}},
               tmp_path / "old.pt")
    assert torch.equal(outputs(load_converted(tmp_path / "old.pt"), images),
                       outputs(new, images))


# -- issue 10.8: map_location ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["cpu", torch.device("cpu"), lambda storage, _loc: storage])
def test_load_accepts_every_map_location_form(tmp_path, images, where):
    model = perturbed(oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW))
    loaded = round_trip(model, tmp_path, map_location=where)
    assert {p.device for p in loaded.parameters()} == {torch.device("cpu")}
    assert torch.equal(outputs(loaded, images), outputs(model, images))


def test_load_puts_every_format_on_the_mapped_device(tmp_path):
    model = oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW)
    oat_plugins.save(model, tmp_path / "cond.pt")
    save_exported(model, 0.5, tmp_path / "plain.pt")
    new, _ = convert(model.export(0.5), budget=0.5)
    save_converted(new, tmp_path / "gdws.pt", spec=model.backbone_spec)
    meta = torch.device("meta")
    for loaded in (oat_plugins.load(tmp_path / "cond.pt", map_location="meta"),
                   load_exported(tmp_path / "plain.pt", map_location=meta),
                   load_converted(tmp_path / "gdws.pt", map_location="meta")):
        tensors = [*loaded.parameters(), *loaded.buffers()]
        assert tensors and all(t.device == meta for t in tensors)


def test_one_model_device_helper():
    from oat_plugins._device import model_device

    assert model_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    buffers_only = nn.Module()
    buffers_only.register_buffer("b", torch.zeros(1, device="meta"))
    assert model_device(buffers_only) == torch.device("meta")
    assert model_device(nn.ReLU()) == torch.device("cpu")


def test_info_describes_every_format(tmp_path, capsys):
    from oat_plugins.cli import main

    model = oat_plugins.wrap("resnet10t", "film", model_kwargs=NARROW)
    model.reset_classifier(4, global_pool="max")
    oat_plugins.save(model, tmp_path / "cond.pt")
    save_exported(model, 0.25, tmp_path / "plain.pt")
    save_exported(model, 0.25, tmp_path / "folder", format="safetensors")
    new, _ = convert(model.export(0.25), budget=0.5)
    save_converted(new, tmp_path / "gdws.pt", spec=model.backbone_spec)
    printed = {}
    for name in ("cond.pt", "plain.pt", "gdws.pt", "folder"):
        assert main(["info", "--checkpoint", str(tmp_path / name)]) == 0
        printed[name] = capsys.readouterr().out
    assert "conditional-model version 2" in printed["cond.pt"]
    assert "conditioned with 'film'" in printed["cond.pt"]
    assert "exported-model version 2" in printed["plain.pt"] and "λ: 0.25" in printed["plain.pt"]
    assert "gdws-model version 1" in printed["gdws.pt"]
    for text in printed["cond.pt"], printed["plain.pt"], printed["gdws.pt"]:
        assert "timm 'resnet10t'" in text and "'stem_width': 8" in text
        assert "'global_pool': 'max'" in text
    assert "'lambda': 0.25" in printed["folder"]
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    assert main(["info", "--checkpoint", str(tmp_path / "other.pt")]) == 2
    assert "not an oat-plugins model file" in capsys.readouterr().err
