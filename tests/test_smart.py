"""SMART (`smart`): two expert masks (clean, adversarial) on shared weights."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import oat_plugins
from oat_plugins.layers.expert_masks import expert_masks, measuring
from oat_plugins.layers.mask_selection import check_pair, pair_counts, saliency_scores
from oat_plugins.methods.smart import path_costs
from oat_plugins.samplers import DiscreteLambdaSampler
from oat_plugins.stats import count_nonzero
from oat_plugins.surgery import NothingToConditionError

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4)


def small(**options) -> oat_plugins.ConditionalModel:
    """timm's test_byobnet (residual blocks, SE and shortcut convs), timm's zero-initialised
    norms opened so every block reaches the output, wrapped in eval mode."""
    torch.manual_seed(0)
    backbone = timm.create_model("test_byobnet", num_classes=10)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
    return oat_plugins.wrap(backbone, "smart", normalize=None, **options).eval()


def at(model, lam, x=X):
    with model.at(lam), torch.no_grad():
        return model(x)


def originals(model):
    return [(mod.parametrizations[name].original, masks)
            for mod, name, masks in expert_masks(model.backbone)]


# -- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("options, match", [
    ({"density": 0.6, "overlap": 0.0}, "more than all of them"),
    ({"density": [0.7, 0.5], "overlap": 0.2}, "raise overlap"),
    ({"density": 0.0}, "density must be"),
    ({"density": [0.5]}, "pair"),
    ({"density": "half"}, "density must be"),
    ({"overlap": 1.5}, "overlap must be"),
    ({"overlap": True}, "overlap must be"),
    ({"selection": "snip"}, "unknown selection"),
    ({"lambda_rule": "dial"}, "unknown lambda_rule"),
    ({"layers": "last:0"}, "K >= 1"),
    ({"layers": "stages.("}, "regular expression"),
    ({"layers": 3}, "layers must be"),
    ({"sparsity": 0.5}, "unknown option"),
])
def test_bad_options_raise_one_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        oat_plugins.get_method("smart")(**options)


def test_layer_choices_that_select_nothing_or_too_many_stages_raise():
    with pytest.raises(NothingToConditionError, match="layers='nothing_here'"):
        small(layers="nothing_here")
    with pytest.raises(ValueError, match="at least 9 stages"):
        small(layers="last:9")


def test_pair_counts_are_feasible_for_tiny_tensors():
    check_pair((0.5, 0.5), 0.0)
    assert pair_counts(3, (0.5, 0.5), 0.0) == (2, 2, 1)  # rounding needs one shared entry
    assert pair_counts(100, (0.3, 0.5), 0.5) == (30, 50, 15)


# -- masks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("selection", ["random", "magnitude"])
@pytest.mark.parametrize("density, overlap", [(0.5, 0.0), ([0.3, 0.5], 0.5), (0.6, 0.4),
                                              (0.4, 1.0)])
def test_masks_have_the_asked_density_and_overlap(selection, density, overlap):
    model = small(density=density, overlap=overlap, selection=selection)
    d_c, d_a = model.method.options.densities
    kept = shared = smaller = total = 0
    for weight, masks in originals(model):
        n = weight.numel()
        k_c, k_a = int(masks.clean.sum()), int(masks.adversarial.sum())
        assert (k_c, k_a, int((masks.clean & masks.adversarial).sum())) == \
            pair_counts(n, (d_c, d_a), overlap)
        assert abs(k_c / n - d_c) <= 1 / n and abs(k_a / n - d_a) <= 1 / n
        assert not bool(weight[~masks.union].any())  # zero where no path keeps it
        kept += k_c + k_a
        shared += int((masks.clean & masks.adversarial).sum())
        smaller += min(k_c, k_a)
        total += n
    assert kept / total == pytest.approx(d_c + d_a, abs=0.01)
    assert shared / smaller == pytest.approx(overlap, abs=0.01)


def test_default_masks_are_the_prototypes_disjoint_halves():
    model = small()
    for weight, masks in originals(model):
        assert not bool((masks.clean & masks.adversarial).any())
        if weight.numel() % 2 == 0:
            assert bool(masks.union.all())


def test_magnitude_deals_the_largest_weights_to_both_paths():
    torch.manual_seed(0)
    backbone = timm.create_model("test_byobnet", num_classes=10)
    before = {n: m.weight.detach().clone() for n, m in backbone.named_modules()
              if isinstance(m, nn.Conv2d)}
    model = oat_plugins.wrap(backbone, "smart", normalize=None, selection="magnitude",
                             density=0.25)
    for mod, _, masks in expert_masks(model.backbone):
        w = next(v for n, v in before.items() if backbone.get_submodule(n) is mod).abs()
        top = w.flatten().topk(masks.union.sum()).values.min()
        assert bool((w[masks.union] >= top).all())  # the union is the top half
        if w.numel() >= 1000:  # and neither path took all of the largest weights
            assert float(w[masks.clean].mean()) == pytest.approx(
                float(w[masks.adversarial].mean()), rel=0.05)


def test_random_selection_is_seeded():
    a, b, c = small(seed=1), small(seed=1), small(seed=2)
    pairs = [originals(m) for m in (a, b, c)]
    assert all(torch.equal(x[1].clean, y[1].clean) for x, y in zip(*pairs[:2], strict=True))
    assert not all(torch.equal(x[1].clean, y[1].clean)
                   for x, y in zip(pairs[0], pairs[2], strict=True))


@pytest.mark.parametrize("layers, expected", [
    ("last:2", lambda n: n.startswith(("stages.2", "stages.3", "final_conv"))),  # to the end
    ("^stages\\.1\\.", lambda n: n.startswith("stages.1.")),
])
def test_layers_option_masks_only_the_chosen_layers(layers, expected):
    model = small(layers=layers)
    names = {id(m): n for n, m in model.backbone.named_modules()}
    masked = {names[id(mod)] for mod, _, _ in expert_masks(model.backbone)}
    convs = [n for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d)]
    assert masked and masked == {n for n in convs if expected(n)}


# -- function of each path ---------------------------------------------------------------------
@pytest.mark.parametrize("lam, path", [(0.0, "clean"), (1.0, "adversarial")])
def test_output_depends_only_on_the_active_paths_weights(lam, path):
    model = small(overlap=0.3, density=0.5)
    other = 1.0 - lam
    before, before_other = at(model, lam), at(model, other)
    with torch.no_grad():
        for weight, masks in originals(model):
            weight.add_(torch.randn_like(weight) * ~getattr(masks, path))
    torch.testing.assert_close(at(model, lam), before, rtol=0, atol=0)
    assert not torch.allclose(at(model, other), before_other, atol=1e-3)  # not vacuous


@pytest.mark.parametrize("lam, path", [(0.0, "clean"), (1.0, "adversarial")])
def test_gradients_reach_only_the_active_paths_weights(lam, path):
    model = small(overlap=0.3)
    with model.at(lam):
        F.cross_entropy(model(X), Y).backward()
    reached = 0
    for weight, masks in originals(model):
        assert not bool(weight.grad[~getattr(masks, path)].any())
        reached += int((weight.grad != 0).sum())
    assert reached > 0


def test_clean_only_weights_are_trained_only_by_clean_samples():
    model = small().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [w.detach().clone() for w, _ in originals(model)]
    for _ in range(2):
        with model.at(torch.ones(4)):  # adversarial samples only
            loss = F.cross_entropy(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = False
    for (w, masks), w0 in zip(originals(model), before, strict=True):
        clean_only = masks.clean & ~masks.adversarial
        assert torch.equal(w[clean_only], w0[clean_only])
        changed |= not torch.equal(w[masks.adversarial], w0[masks.adversarial])
    assert changed


def test_blend_rule_is_a_dial_and_switch_rule_a_switch():
    blend, switch = small(overlap=0.5, lambda_rule="blend"), small(overlap=0.5)
    for mod, name, masks in expert_masks(blend.backbone):
        w = mod.parametrizations[name].original
        with blend.at(0.3), torch.no_grad():
            expected = w * (0.7 * masks.clean.float() + 0.3 * masks.adversarial.float())
            torch.testing.assert_close(getattr(mod, name), expected)
    for mod, name, masks in expert_masks(switch.backbone):
        w = mod.parametrizations[name].original
        with switch.at(0.3), torch.no_grad():
            assert torch.equal(getattr(mod, name), w * masks.adversarial)
    torch.testing.assert_close(at(switch, 0.3), at(switch, 1.0), rtol=0, atol=0)
    mid = at(blend, 0.5)
    assert not torch.allclose(mid, at(blend, 1.0), atol=1e-3)
    assert not torch.allclose(mid, at(blend, 0.0), atol=1e-3)


# -- data-driven masks ------------------------------------------------------------------------
def test_saliency_masks_are_pending_until_prepare_then_follow_each_paths_saliency():
    model = small(selection="saliency", density=0.3)
    with pytest.raises(RuntimeError, match="prepare"):
        at(model, 0.0)
    reference = copy.deepcopy(model)
    model.method.prepare(model, X, Y)
    ref_weights = [w for w, _ in originals(reference)]
    with measuring([m for _, m in originals(reference)]), reference.at(0.0):
        clean_scores = saliency_scores(reference, ref_weights, X, Y)
    differ = False
    for (weight, masks), score in zip(originals(model), clean_scores, strict=True):
        assert masks.clean.float().mean() == pytest.approx(0.3, abs=1 / weight.numel())
        assert not bool(weight[~masks.union].any())
        if weight.numel() >= 1000:
            assert score[masks.clean].mean() > 2 * score[~masks.clean].mean()
        differ |= not torch.equal(masks.clean, masks.adversarial)
    assert differ  # the adversarial path follows its own (adversarial-batch) saliency
    chosen = [m.clean.clone() for _, m in originals(model)]
    model.method.prepare(model, X.flip(0), Y)  # set once: a second call changes nothing
    assert all(torch.equal(c, m.clean) for c, (_, m) in zip(chosen, originals(model),
                                                              strict=True))


# -- persistence, export, optimizers ---------------------------------------------------------
def test_save_load_keeps_masks_and_options(tmp_path):
    model = small(density=[0.3, 0.5], overlap=0.5, layers="^stages", selection="saliency")
    model.method.prepare(model, X, Y)
    oat_plugins.save(model, tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt")
    assert loaded.method.options == model.method.options
    for (_, a), (_, b) in zip(originals(model), originals(loaded), strict=True):
        assert torch.equal(a.clean, b.clean) and torch.equal(a.adversarial, b.adversarial)
        assert not b.pending
    for lam in (0.0, 0.5, 1.0):
        assert torch.equal(at(loaded, lam), at(model, lam))


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
], ids=["sgd-momentum-wd", "adamw"])
def test_exact_zeros_survive_training_and_export(optimizer):
    model = small(density=0.3, overlap=0.5).train()
    opt = optimizer(model.parameters())
    lam = torch.tensor([0.0, 0.0, 1.0, 1.0])
    for _ in range(3):
        with model.at(lam):
            loss = F.cross_entropy(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for weight, masks in originals(model):
        assert not bool(weight[~masks.union].any())
    for lam_value, path in ((0.0, "clean"), (1.0, "adversarial")):
        plain = model.export(lam_value)
        exported = dict(plain[-1].named_parameters()) if isinstance(plain, nn.Sequential) \
            else dict(plain.named_parameters())
        for (mod, name, masks) in expert_masks(model.backbone):
            qual = next(n for n, m in model.backbone.named_modules() if m is mod)
            w = exported[f"{qual}.{name}"]
            assert not bool(w[~getattr(masks, path)].any())
            assert bool(w[getattr(masks, path)].any())
        torch.testing.assert_close(plain(X), at(model, lam_value), rtol=1e-4, atol=1e-5)


# -- accounting ------------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_path_costs_count_non_zeros_and_macs_by_hand():
    model = oat_plugins.wrap(_Tiny(), "smart", normalize=None, density=[0.25, 0.5],
                             overlap=1.0, linear=False)
    (_, masks), = originals(model)
    n = 4 * 3 * 9  # conv entries; the linear layer stays dense
    k_c, k_a = round(0.25 * n), round(0.5 * n)
    assert (int(masks.clean.sum()), int(masks.adversarial.sum())) == (k_c, k_a)
    costs = path_costs(model, (3, 8, 8))
    other = 4 + 8 + 2  # the norm's weight (its bias starts at 0), fc weight and bias
    assert costs["clean"].params == k_c + other
    assert costs["adversarial"].params == k_a + other
    assert costs["union"].params == k_a + other + 4  # nested masks, plus the robust norm
    assert costs["dense"].params == n + 8 + 10
    assert costs["clean"].macs == k_c * 64 + 8 and costs["dense"].macs == n * 64 + 8
    assert costs["clean"].params == count_nonzero(model.export(0.0)).nonzero
    summary = model.summary()
    assert "clean path (λ=0)" in summary and "both paths stored" in summary


def test_check_sampler_needs_both_paths():
    method = oat_plugins.get_method("smart")()
    method.check_sampler(DiscreteLambdaSampler((0.0, 1.0), clean_fraction=0.5))
    with pytest.raises(ValueError, match="must draw both"):
        method.check_sampler(DiscreteLambdaSampler((0.0, 1.0), clean_fraction=0.0))


# -- held-out timm families ------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs", [
    ("test_efficientnet", {}),
    ("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (16, 24, 32, 48)}),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
])
def test_timm_families_wrap_run_and_export(name, kwargs):
    torch.manual_seed(0)
    model = oat_plugins.wrap(name, "smart", model_kwargs={"num_classes": 10, **kwargs},
                             layers="last:2").eval()
    assert expert_masks(model.backbone)
    for lam in (0.0, 0.5, 1.0):
        torch.testing.assert_close(model.export(lam).eval()(X), at(model, lam),
                                   rtol=1e-4, atol=1e-4)
