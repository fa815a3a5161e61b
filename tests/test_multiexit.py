"""Multi-exit models (RDI-Nets, oat_plugins.exits): exits on a CNN and a ViT, real early
stopping, calibration on held-out data only, MACs with rejected heads, save/load, composition
with a conditioning method and the summed training loss."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import oat_plugins
from oat_plugins.exits import MultiExitNet, entropy
from oat_plugins.losses import LossContext, LossForward
from oat_plugins.surgery import foreign_modules

CNN = ("resnet10t", {})
VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4})
SWIN = ("swin_tiny_patch4_window7_224",  # channels-last (N, H, W, C) features
        {"img_size": 32, "window_size": 2, "depths": (1, 1, 1, 1), "embed_dim": 24,
         "num_heads": (1, 1, 1, 1)})
X = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HELD_OUT = TensorDataset(torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                         torch.zeros(48, dtype=torch.long))


def build(family=CNN, method="multiexit", **kwargs) -> oat_plugins.ConditionalModel:
    torch.manual_seed(0)
    name, extra = family
    model = oat_plugins.wrap(name, method, model_kwargs={"num_classes": 10, **extra}, **kwargs)
    with torch.no_grad():  # spread the exits' confidences so that routing has choices
        for head in model.exit_heads:
            head[-1].weight.mul_(20.0)
    return model.eval()


class _TestSplit(Dataset):
    """A dataset that says it is a test split, as torchvision's do (``train=False``)."""

    train = False

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.rand(3, 32, 32), 0


# -- exits on families ------------------------------------------------------------------------
@pytest.mark.parametrize("family, points", [(CNN, [1, 2, 3]), (VIT, [0, 1, 2]),
                                            (SWIN, [0, 1, 2])], ids=["cnn", "vit", "swin"])
def test_auto_exits_and_last_exit_is_the_backbone(family, points):
    torch.manual_seed(0)
    backbone = timm.create_model(family[0], num_classes=10, **family[1]).eval()
    plain = copy.deepcopy(backbone)
    model = oat_plugins.wrap(backbone, "multiexit", normalize=None).eval()
    assert model.exits.spec.points == points  # resnet: the stem (reduction 2) has no exit
    logits = model.exit_logits(X)
    assert len(logits) == len(points) + 1 and all(t.shape == (12, 10) for t in logits)
    with torch.no_grad():
        expected = plain(X)
        torch.testing.assert_close(logits[-1], expected)
        torch.testing.assert_close(model(X), expected)  # uncalibrated: no early exit
    assert torch.isneginf(model.exit_thresholds[:-1]).all()
    assert torch.isposinf(model.exit_thresholds[-1])


def test_exit_logits_are_differentiable_wrt_inputs():
    model = build(VIT)
    x = X.clone().requires_grad_(True)
    sum(t.sum() for t in model.exit_logits(x)[:-1]).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("exits", [[4], [-1], "all", []])
def test_bad_exit_points_are_refused(exits):
    with pytest.raises(ValueError, match="exit"):
        oat_plugins.wrap("resnet10t", "multiexit", exits=exits, model_kwargs={"num_classes": 10})


def test_a_backbone_without_feature_info_is_refused():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    with pytest.raises(ValueError, match="feature_info lists at least two stages"):
        oat_plugins.wrap(backbone, "multiexit", normalize=None)


@pytest.mark.parametrize("name, kwargs", [
    ("nf_resnet26", {}),  # norm-free
    ("efficientvit_m0", {"img_size": 32}),  # built for 32 with timm's 224 pretrained_cfg
    ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (16, 24, 32, 48)}),  # LayerNorm2d
])
def test_exits_on_more_families_export_equal_to_the_model(name, kwargs):
    model = build((name, kwargs))
    n = len(model.exit_thresholds)
    model.calibrate(HELD_OUT, shares=[1 / n] * n)
    with torch.no_grad():
        torch.testing.assert_close(model.export(0.0).eval()(X), model(X), rtol=1e-4,
                                   atol=1e-4)


def test_a_family_that_is_not_a_chain_is_refused():
    with pytest.raises(ValueError, match="cannot split Xcit into stage segments"):
        oat_plugins.wrap("xcit_nano_12_p16_224", "multiexit",
                         model_kwargs={"num_classes": 10, "img_size": 32})


class _NotAChain(nn.Module):
    """Has feature_info, but its output mixes the stem into the last stage (not a chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Conv2d(8, 8, 3, padding=1)
        self.stage2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)
        self.num_classes = 10
        self.feature_info = [dict(module=m, num_chs=8, reduction=1)
                             for m in ("stem", "stage1", "stage2")]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.stage2(self.stage1(s)) + s

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_a_backbone_that_is_not_a_chain_of_stages_is_refused():
    with pytest.raises(ValueError, match="cannot split _NotAChain into stage segments"):
        oat_plugins.wrap(_NotAChain(), "multiexit", normalize=None)


# -- early stopping ---------------------------------------------------------------------------
def test_later_segments_run_only_for_samples_that_did_not_exit():
    model = build()
    model.calibrate(HELD_OUT, shares=[0.25, 0.25, 0.25, 0.25])
    seen: dict[str, list[int]] = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):  # the segments' first modules
        model.backbone.get_submodule(name).register_forward_pre_hook(
            lambda _, args, name=name: seen.setdefault(name, []).append(args[0].shape[0]))
    with torch.no_grad():
        logits = model.exit_logits(X)
        seen.clear()
        out = model(X)
    exits = model.route(logits)
    assert len(set(exits.tolist())) > 1, "routing must take several exits for this test"
    assert seen["layer1"] == [12]
    for k, name in enumerate(("layer2", "layer3", "layer4")):
        still_running = int((exits > k).sum())
        assert seen.get(name, [0]) == [still_running]
    routed = torch.stack([logits[e][i] for i, e in enumerate(exits.tolist())])
    torch.testing.assert_close(out, routed, rtol=1e-4, atol=1e-5)


def test_route_is_the_first_exit_below_its_threshold():
    model = build()
    model.exits.set_thresholds([0.5, 1.0, 2.0])
    logits = model.exit_logits(X)
    h = torch.stack([entropy(t) for t in logits[:-1]], 1)
    expected = [next((i for i in range(3) if h[n, i] < (0.5, 1.0, 2.0)[i]), 3)
                for n in range(12)]
    assert model.route(logits).tolist() == expected


# -- calibration --------------------------------------------------------------------------------
def test_calibration_refuses_the_test_split():
    model = build()
    for data in (_TestSplit(), DataLoader(_TestSplit(), batch_size=4),
                 DataLoader(Subset(_TestSplit(), [0, 1]), batch_size=2)):
        with pytest.raises(ValueError, match="never on the test split"):
            model.calibrate(data, budget=0.9)
    assert torch.isneginf(model.exit_thresholds[:-1]).all()  # nothing was fitted


def test_shares_and_budget_calibration_and_the_budget_knob():
    model = build()
    summary = model.calibrate(DataLoader(HELD_OUT, batch_size=16), shares=[0.5, 0.25, 0, 0.25])
    assert summary["exit_shares"] == pytest.approx([0.5, 0.25, 0.0, 0.25])
    fractions = []
    for budget in (0.7, 0.9, 1.2):
        summary = model.set_exit_budget(budget)
        assert summary["mean_fraction"] <= budget
        fractions.append(summary["mean_fraction"])
    assert fractions == sorted(fractions)  # more compute → later exits
    assert model.set_exit_budget(1.0)["thresholds"][:-1] == [float("-inf")] * 3
    with pytest.raises(ValueError, match="below the cheapest routing"):
        model.set_exit_budget(0.05)
    with pytest.raises(ValueError, match="exactly one of budget"):
        model.calibrate(HELD_OUT)


def test_set_exit_budget_needs_a_calibration():
    with pytest.raises(ValueError, match="not calibrated"):
        build().set_exit_budget(0.8)


# -- cost ---------------------------------------------------------------------------------------
def _executed_macs(model: nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("family", [CNN, VIT, SWIN], ids=["cnn", "vit", "swin"])
def test_cost_counts_every_head_evaluated_and_rejected(family):
    model = build(family)
    cost = model.cost(X)
    assert cost["mean_macs"] == cost["backbone_macs"]  # no head is evaluated uncalibrated
    plain = model.export(0.0, exits=False)
    assert cost["backbone_macs"] == _executed_macs(plain, X[:1])
    model.calibrate(HELD_OUT, shares=[0.25, 0.25, 0.25, 0.25])
    cost = model.cost(X)
    assert len(set(model.route(model.exit_logits(X)).tolist())) > 1
    # What the early-stopping forward really executes, per sample: segments run and every
    # head evaluated on the way, the rejected ones included.
    assert cost["mean_macs"] == pytest.approx(_executed_macs(model, X) / 12, rel=1e-6)
    segments, heads = cost["segment_macs"], cost["head_macs"]
    per_exit = [sum(segments[:e + 1]) + sum(heads[:min(e + 1, len(heads))])
                for e in range(len(segments))]
    expected = sum(s * p for s, p in zip(cost["exit_shares"], per_exit, strict=True))
    assert cost["mean_macs"] == pytest.approx(expected)
    assert cost["fraction"] == pytest.approx(cost["mean_macs"] / cost["backbone_macs"])


# -- files and composition -----------------------------------------------------------------------
def test_save_load_is_exact_with_thresholds_and_calibration(tmp_path):
    model = build()
    model.calibrate(HELD_OUT, budget=0.9)
    oat_plugins.save(model, tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt")
    assert torch.equal(loaded.exit_thresholds, model.exit_thresholds)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert loaded.set_exit_budget(0.8) == model.set_exit_budget(0.8)
    assert model.set_exit_budget(0.8)["calibration_size"] == [48, 3, 32, 32]


@pytest.mark.parametrize("method", ["float", "floats", "film", "smart"])
def test_a_method_with_exits_conditions_the_heads_and_exports_equal_to_the_model(method):
    model = build(method=method, exits="auto")
    assert any(r.name.startswith("oat_exits.") for r in model.replacements)
    with torch.no_grad():
        for p in model.parameters():  # α and the robust norms away from their start
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    model.calibrate(HELD_OUT, shares=[0.25, 0.25, 0.25, 0.25])
    for lam in (0.0, 1.0):
        exported = model.export(lam).eval()
        core = exported[-1]
        assert isinstance(core, MultiExitNet)
        assert foreign_modules(core.backbone) == [] and foreign_modules(core.heads) == []
        plain = model.export(lam, exits=False).eval()
        assert type(plain[-1]) is type(core.backbone) and foreign_modules(plain) == []
        with torch.no_grad(), model.at(lam):
            torch.testing.assert_close(exported(X), model(X), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(plain(X), model.exit_logits(X)[-1], rtol=1e-4,
                                       atol=1e-4)
    with torch.no_grad(), model.at(0.0):
        clean = model.exit_logits(X)[0]
    with torch.no_grad(), model.at(1.0):
        robust = model.exit_logits(X)[0]
    assert not torch.allclose(clean, robust)  # the first exit's head is conditioned too


def test_film_with_exits_serves_a_per_sample_lambda_with_early_stopping():
    model = build(method="film", exits="auto")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    model.calibrate(HELD_OUT, shares=[0.25, 0.25, 0.25, 0.25])
    lam = torch.tensor([0.0, 1.0, 0.3] * 4)
    with torch.no_grad(), model.at(lam):
        mixed = model(X)
    for i in range(12):
        with torch.no_grad(), model.at(float(lam[i])):
            torch.testing.assert_close(mixed[i:i + 1], model(X[i:i + 1]), rtol=1e-4,
                                       atol=1e-4)


# -- training -------------------------------------------------------------------------------------
def test_training_loss_is_the_weighted_sum_over_exits_of_half_clean_half_adversarial():
    weights = [0.5, 1.0, 2.0, 1.0]
    model = build(exit_weights=weights)
    y = torch.arange(12) % 10
    x_adv = (X + 0.03 * torch.randn(X.shape, generator=torch.Generator().manual_seed(4))
             ).clamp(0, 1)
    lam = torch.ones(12)
    ctx = LossContext(model, X, y, lam, x_adv, LossForward(model))
    loss, stats = model.training_loss(ctx)
    with torch.no_grad():
        clean, adv = model.exit_logits(X), model.exit_logits(x_adv)
    expected = sum(w * (0.5 * F.cross_entropy(c, y) + 0.5 * F.cross_entropy(a, y))
                   for w, c, a in zip(weights, clean, adv, strict=True))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0)
               for head in model.exit_heads for p in head[-1].parameters())
    assert stats["n_adv"] == 12


# -- evaluation -----------------------------------------------------------------------------
def test_evaluate_reports_the_mac_fraction_next_to_accuracy():
    model = build()
    model.calibrate(HELD_OUT, budget=0.9)
    y = model(X).argmax(1)
    result = oat_plugins.evaluate(model, (X, y), [0.0], attack="fgsm", batch_size=12,
                                  progress=False)
    assert result.rows[0].clean_acc == 1.0
    assert result.rows[0].mac_fraction == pytest.approx(model.cost(X)["fraction"])
    assert "MACs (% of backbone)" in result.to_markdown()


def test_cli_eval_sets_the_exit_budget_from_the_saved_calibration(tmp_path, capsys):
    from oat_plugins.cli import main

    model = build()
    model.calibrate(HELD_OUT, budget=0.9)
    oat_plugins.save(model, tmp_path / "m.pt")
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", "bundled",
                 "--lambdas", "0", "--attack", "fgsm", "--n-examples", "8",
                 "--exit-budget", "0.8", "--out", str(out), "--no-progress"]) == 0
    row = oat_plugins.SweepResult.from_json(out / "metrics.json").rows[0]
    assert row.mac_fraction is not None and "MACs (% of backbone)" in capsys.readouterr().out


def test_weights_only_export_files_refuse_a_model_with_exits(tmp_path):
    with pytest.raises(ValueError, match="model.export\\(λ, exits=False\\)"):
        oat_plugins.save_exported(build(), 0.0, tmp_path / "plain.pt")


def test_cli_train_with_exits_calibrates_on_held_out_training_images(tmp_path, capsys):
    """`oat-plugins train --exits auto` on float: the thresholds are calibrated at the end, at
    --exit-budget, on training images kept out of training (not augmented); the final table
    reports MACs."""
    import argparse

    from oat_plugins.cli import main
    from oat_plugins.cli.train import _calibration_split
    from oat_plugins.data import load_dataset

    args = argparse.Namespace(calibration_samples=40, exits="auto", method="float", seed=0,
                              data="bundled", data_dir=None, no_download=True, image_size=None)
    train = load_dataset("bundled", "train")
    kept, held = _calibration_split(train, args)
    assert len(kept) + len(held) == len(train) and len(held) == 40
    assert not set(kept.indices) & set(held.indices)
    assert torch.equal(held[0][0], held[0][0])  # not augmented
    args.exits = None
    assert _calibration_split(train, args) == (train, None)  # float alone has no exits

    out = tmp_path / "run"
    assert main(["train", "--model", "resnet10t", "--model-kwargs",
                 '{"channels": [8, 16, 16, 16], "stem_width": 8}', "--method", "float",
                 "--exits", "auto", "--calibration-samples", "40", "--exit-budget", "0.97",
                 "--data", "bundled", "--limit-train", "32", "--batch-size", "16",
                 "--epochs", "1", "--steps", "1", "--eval-samples", "8", "--final-steps", "1",
                 "--final-lambdas", "0,1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exits calibrated at λ = 1 on 40 held-out training images" in printed
    assert "MACs (% of backbone)" in printed
    model = oat_plugins.load(out / "model.pt")
    assert model.exits is not None and model.method_name == "float"
    again = copy.deepcopy(model)
    assert again.set_exit_budget(0.97)["thresholds"] == model.exits.summary()["thresholds"]
