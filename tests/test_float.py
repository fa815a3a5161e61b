"""FLOAT (`float`) and FLOATS (`floats`): weight-conditioned once-for-all models."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn
from torch.nn.utils import parametrize

import oat_plugins
from oat_plugins.layers import DualNorm
from oat_plugins.layers.mask_selection import masks_from_scores
from oat_plugins.layers.weight_mask import WeightMask, masked_density, weight_masks
from oat_plugins.layers.weight_noise import WeightNoise, add_scaled_noise
from oat_plugins.methods.float import snip_prune
from oat_plugins.samplers import ExtremesLambdaSampler
from oat_plugins.stats import count_nonzero
from oat_plugins.surgery import foreign_modules

X = (2, 3, 32, 32)
SMALL = "test_byobnet"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def noises(model: nn.Module) -> list[WeightNoise]:
    return [m for m in model.modules() if isinstance(m, WeightNoise)]


def conditioned(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]


def small(method: str = "float", **options) -> tuple[nn.Module, oat_plugins.ConditionalModel]:
    """A random-init timm ``test_byobnet`` (a small ResNet-like net with shortcut convs and SE
    convs, 10 classes), a plain copy of it, and the wrapped model."""
    backbone = timm.create_model(SMALL, num_classes=10)
    plain = copy.deepcopy(backbone)
    return plain, oat_plugins.wrap(backbone, method, normalize=None, **options)


def masked_effective(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(effective weight, underlying parameter, mask) for every masked weight."""
    return [(getattr(mod, name), mod.parametrizations[name].original, mask.mask)
            for mod, name, mask in weight_masks(model)]


# -- registration and options --------------------------------------------------------------
def test_registered_with_the_default_recipes_sampler():
    """The default recipe ('oat') samples OAT's λ set; FLOAT's own extremes stay one option
    away."""
    assert {"float", "floats"} <= set(oat_plugins.available_methods())
    for name in ("float", "floats"):
        sampler = oat_plugins.get_method(name)().default_sampler()
        assert sampler.lambdas == [0.0, 0.1, 0.2, 0.3, 0.4, 1.0]
        extremes = oat_plugins.get_method(name)(recipe="reference").default_sampler()
        lam = extremes(8, torch.Generator().manual_seed(0))
        assert sorted(lam.tolist()) == [0.0] * 4 + [1.0] * 4


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("float", {"density": 0.0}, "density"),
        ("float", {"density": 1.5}, "density"),
        ("float", {"density": -0.1}, "density"),
        ("float", {"density": True}, "density"),
        ("floats", {"density": None}, "density"),
        ("float", {"noise": "gaussian"}, "noise mode"),
        ("float", {"prune": "random"}, "prune criterion"),
        ("float", {"prune_scope": "network"}, "prune_scope"),
        ("float", {"alpha": 0.1}, "unknown option"),
    ],
)
def test_bad_options_raise(method, options, match):
    with pytest.raises(ValueError, match=match):
        oat_plugins.wrap(timm.create_model("regnetx_002", num_classes=10), method, **options)


def test_nothing_to_condition():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(oat_plugins.NothingToConditionError, match="no weight"):
        oat_plugins.wrap(mlp, "float", normalize=None, linear=False)


# -- λ = 0, noise, determinism ---------------------------------------------------------------
def test_lambda0_is_the_backbone_with_clean_norm_and_no_noise():
    plain, model = small()
    plain.eval(), model.eval()
    x = torch.rand(X)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        model.set_lambda(torch.zeros(2))  # per-sample zeros: same thing
        assert torch.equal(model(x), plain(x))
        model.set_lambda(1.0)
        assert (model(x) - plain(x)).abs().max() > 1e-3  # the noise does something


def test_effective_weight_is_w_plus_alpha_lambda_eta():
    _, model = small()
    conv = model.backbone.stages[1][0].conv2_kxk.conv
    noise = conv.parametrizations.weight[0]
    w = conv.parametrizations.weight.original
    for lam in (0.0, 0.3, 1.0):
        model.set_lambda(lam)
        torch.testing.assert_close(conv.weight, w + 0.25 * lam * noise.noise, rtol=0, atol=0)
    assert noise.alpha.shape == () and float(noise.alpha.detach()) == 0.25
    # η ~ N(0, std(W)²): the scale follows the layer's weights
    ratio = float(noise.noise.std() / w.detach().std())
    assert 0.9 < ratio < 1.1


@pytest.mark.parametrize("alpha_shape", [(), (4, 1, 1, 1)])
def test_fused_noise_gradients_equal_autograds_own_twice_over(alpha_shape):
    """W + λ·α·η is one fused kernel with a dot-product backward for α: its first and second
    derivatives are those of the plain expression (float64 gradcheck)."""
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    alpha = torch.rand(alpha_shape, dtype=torch.float64, requires_grad=True)
    fused = lambda w, a: add_scaled_noise(w, noise, a, 0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (weight, alpha))
    assert torch.autograd.gradgradcheck(fused, (weight, alpha))
    g = torch.randn_like(weight)
    expected = torch.autograd.grad(weight + (alpha * 0.3) * noise, (weight, alpha), g)
    torch.testing.assert_close(torch.autograd.grad(fused(weight, alpha), (weight, alpha), g),
                               expected)


def test_fixed_noise_is_deterministic_seeded_and_independent_of_global_rng():
    backbone = timm.create_model(SMALL, num_classes=10)
    copies = [copy.deepcopy(backbone) for _ in range(3)]
    torch.manual_seed(1)
    a = oat_plugins.wrap(copies[0], "float", seed=7)
    torch.manual_seed(2)
    b = oat_plugins.wrap(copies[1], "float", seed=7)
    c = oat_plugins.wrap(copies[2], "float", seed=8)
    for na, nb, nc in zip(noises(a), noises(b), noises(c), strict=True):
        assert torch.equal(na.noise, nb.noise)
        assert not torch.equal(na.noise, nc.noise)
    layers = noises(a)
    assert not torch.equal(layers[1].noise.flatten()[:100], layers[2].noise.flatten()[:100])
    assert a.deterministic
    a.eval().set_lambda(0.7)
    x = torch.rand(X)
    with torch.no_grad():
        assert torch.equal(a(x), a(x))
    assert all(k in a.state_dict() for k in
               ("backbone.stem.conv.parametrizations.weight.0.noise",
                "backbone.stem.conv.parametrizations.weight.0.alpha"))


def test_resample_draws_fresh_noise_and_refuses_export():
    _, model = small(noise="resample")
    assert not model.deterministic
    assert all(n.noise is None for n in noises(model))
    model.eval()
    x = torch.rand(X)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # λ = 0: no noise drawn
        model.set_lambda(1.0)
        assert not torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="resample"):
        model.export(0.5)
    assert "parameters" in model.summary()


def test_alpha_learnable_scalar_or_per_channel():
    _, model = small(alpha_per_channel=True)
    conv = model.backbone.stem.conv
    alpha = conv.parametrizations.weight[0].alpha
    assert alpha.shape == (conv.out_channels, 1, 1, 1) and alpha.requires_grad
    model.train().set_lambda(torch.tensor([0.0, 1.0, 1.0, 0.0]))
    F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([1, 2, 3, 4])).backward()
    assert alpha.grad is not None and alpha.grad.abs().sum() > 0


# -- per-sample λ ---------------------------------------------------------------------------
def test_mixed_lambda_batch_equals_per_lambda_forwards_eval():
    _, model = small()
    model.eval()
    x = torch.rand(5, 3, 32, 32)
    lam = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0])
    with torch.no_grad():
        mixed = model.set_lambda(lam)(x)
        for i, value in enumerate(lam.tolist()):
            one = model.set_lambda(value)(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], one, rtol=0, atol=1e-5)
        # forward_features / forward_head regroup too
        model.set_lambda(lam)
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), mixed, rtol=0, atol=1e-5)
    assert torch.equal(model.lam, lam)  # the per-sample λ is restored


def test_mixed_extremes_batch_in_train_mode_matches_split_forwards():
    """With FLOAT's sampler (λ ∈ {0, 1}) one per-sample forward in train mode equals the two
    group forwards: same outputs, same gradients, same BatchNorm running statistics."""
    _, model = small()
    split = copy.deepcopy(model)
    model.train(), split.train()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(10, (6,))
    lam = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    out = model.set_lambda(lam)(x)
    clean, adv = (lam == 0).nonzero()[:, 0], (lam == 1).nonzero()[:, 0]
    out_split = torch.empty_like(out)
    out_split[clean] = split.set_lambda(0.0)(x[clean])
    out_split[adv] = split.set_lambda(1.0)(x[adv])
    torch.testing.assert_close(out, out_split, rtol=0, atol=1e-5)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(out_split, y).backward()
    for (name, p), q in zip(model.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), split.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=0, atol=1e-6, msg=name)


# -- export and parameter overhead ------------------------------------------------------------
@pytest.mark.parametrize("method", ["float", "floats"])
def test_export_equals_model_at_several_lambdas(method):
    plain, model = small(method)
    model.eval()
    x = torch.rand(X)
    reference = {}
    for lam in (0.0, 0.3, 0.65, 1.0):
        with torch.no_grad():
            reference[lam] = model.set_lambda(lam)(x)
        exported = model.export(lam).eval()
        assert foreign_modules(exported) == []
        assert not any(parametrize.is_parametrized(m) for m in exported.modules())
        assert n_params(exported) == n_params(plain)
        assert type(exported) is type(plain)
        with torch.no_grad():
            assert (exported(x) - reference[lam]).abs().max() <= 1e-4
    # exporting leaves the conditioned model intact
    with torch.no_grad():
        for lam, ref in reference.items():
            assert torch.equal(model.set_lambda(lam)(x), ref)


def test_export_with_normalisation_from_timm_name():
    model = oat_plugins.wrap("regnetx_002", "float", model_kwargs={"num_classes": 10}).eval()
    x = torch.rand(X)
    with torch.no_grad():
        y = model.set_lambda(0.8)(x)
        assert (model.export(0.8).eval()(x) - y).abs().max() <= 1e-4


@pytest.mark.parametrize("per_channel", [False, True])
def test_parameter_overhead_is_alphas_plus_second_norm(per_channel):
    plain, model = small(alpha_per_channel=per_channel)
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    n_alpha = sum(c.out_channels for c in convs) if per_channel else len(convs)
    n_norm = sum(n_params(n) for n in norms)
    assert n_params(model) - n_params(plain) == n_alpha + n_norm
    assert len(conditioned(model)) == len(convs)  # every conv, the first one included
    assert sum(isinstance(m, DualNorm) for m in model.modules()) == len(norms)
    assert not parametrize.is_parametrized(model.backbone.head.fc)  # head stays plain


def test_linear_layers_auto_and_head_option():
    vit = oat_plugins.wrap("vit_tiny_patch16_224", "float",
                           model_kwargs={"num_classes": 10, "img_size": 32})
    n_linear = sum(isinstance(m, nn.Linear) for m in vit.backbone.modules())
    assert len(conditioned(vit)) == 1 + n_linear - 1  # patch conv + all linears but the head
    assert not parametrize.is_parametrized(vit.backbone.head)
    _, model = small(linear=True, include_head=True)
    assert parametrize.is_parametrized(model.backbone.head.fc)
    _, model = small()
    assert not any(isinstance(m, nn.Linear) for m in conditioned(model))


def test_timm_std_conv_keeps_its_own_forward():
    """StdConv2d standardises its weight in forward: W_eff must be standardised too."""
    net = nn.Sequential(StdConv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    plain = copy.deepcopy(net).eval()
    model = oat_plugins.wrap(net, "float", normalize=None).eval()
    conv = model.backbone[0]
    assert isinstance(conv, StdConv2d)
    x = torch.rand(X)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        model.set_lambda(0.5)
        w = conv.weight
        w_std = F.batch_norm(w.reshape(1, 8, -1), None, None, training=True, momentum=0.0,
                             eps=conv.eps).reshape_as(w)
        expect = F.conv2d(x, w_std, padding=conv.padding)
        torch.testing.assert_close(conv(x), expect, rtol=0, atol=1e-5)
        assert (model.export(0.5).eval()(x) - model(x)).abs().max() <= 1e-4


def test_save_load_round_trip(tmp_path):
    model = oat_plugins.wrap(SMALL, "floats", model_kwargs={"num_classes": 10},
                             density=0.3, seed=3).eval()
    x = torch.rand(X)
    with torch.no_grad():
        y = model.set_lambda(0.6)(x)
    oat_plugins.save(model, tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt").eval()
    assert loaded.method_name == "floats" and loaded.lam == 0.6
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    for a, b in zip(weight_masks(model), weight_masks(loaded), strict=True):
        assert torch.equal(a[2].mask, b[2].mask)


# -- FLOATS ----------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.5, 0.2])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_floats_density_within_one_percent(density, scope):
    _, model = small("floats", density=density, prune_scope=scope)
    kept = masked_density(model)
    assert abs(kept - density) <= 0.01
    masked = masked_effective(model)
    assert len(masked) == len(conditioned(model))
    n_masked = sum(m.numel() for _, _, m in masked)
    model.set_lambda(1.0)  # the noise is masked too: sparse at every λ
    zeros = sum(int((w == 0).sum()) for w, _, _ in masked_effective(model))
    assert abs(zeros / n_masked - (1 - density)) <= 0.01
    if scope == "layer":
        for _, _, mask in masked:
            assert abs(float(mask.float().mean()) - density) <= 0.01
    # reported non-zeros, conditioned and exported
    exported = model.export(1.0)
    nz_model, nz_export = count_nonzero(model), count_nonzero(exported)
    assert nz_export.total == n_params(exported) and nz_model.total == n_params(model)
    exported_weights = sum(int((m.weight != 0).sum()) for m in exported.modules()
                           if isinstance(m, nn.Conv2d))
    assert exported_weights == n_masked - zeros
    for count in (nz_model, nz_export):  # dense rest: biases, norms, head, α
        assert n_masked - zeros <= count.nonzero <= n_masked - zeros + count.total - n_masked
    assert "non-zero parameters" in model.summary()


def test_magnitude_masks_keep_the_largest_weights():
    plain, model = small("floats", density=0.2)
    w = plain.stages[1][0].conv2_kxk.conv.weight.abs()
    mask = model.backbone.stages[1][0].conv2_kxk.conv.parametrizations.weight[1].mask
    assert w[mask].min() >= w[~mask].max()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_floats_zeros_survive_weight_decay_and_momentum(optimizer):
    _, model = small("floats", density=0.3)
    model.train()
    before = [w.detach().clone() for _, w, _ in masked_effective(model)]
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    for step in range(4):
        model.set_lambda(ExtremesLambdaSampler()(4, torch.Generator().manual_seed(step)))
        loss = F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.randint(10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.set_lambda(1.0)
    for (w, original, mask), old in zip(masked_effective(model), before, strict=True):
        assert torch.all(w[~mask] == 0) and torch.all(original[~mask] == 0)
        assert not torch.equal(original[mask], old[mask])  # the kept weights did train
    assert abs(masked_density(model) - 0.3) <= 0.01


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_density_knob_nests_masks_and_restores_the_trained_model(scope, tmp_path):
    _, model = small("floats", density=0.5, prune_scope=scope)
    model.eval().set_lambda(0.5)
    x = torch.rand(X)
    trained = [mask.mask.clone() for _, _, mask in weight_masks(model)]
    with torch.no_grad():
        for _ in range(model.serve_after + 1):  # the served export is built: must not go stale
            y_trained = model(x)
        model.set_density(0.25)
        y_sparser = model(x)
        assert torch.allclose(y_sparser, model.export()(x), atol=1e-6)
    assert not torch.allclose(y_sparser, y_trained, atol=1e-4)
    assert abs(masked_density(model) - 0.25) <= 0.01
    for (w, original, mask), before in zip(masked_effective(model), trained, strict=True):
        assert torch.all(before[mask])  # nested: a subset of the trained mask
        assert torch.all(w[~mask] == 0)
        if scope == "layer":  # the largest trained weights stay
            assert original[mask].abs().min() >= original[before & ~mask].abs().max()
    oat_plugins.save(model, tmp_path / "m.pt")  # a reload keeps the density it was saved at
    with torch.no_grad():
        assert torch.equal(oat_plugins.load(tmp_path / "m.pt").eval().set_lambda(0.5)(x),
                           y_sparser)
        model.set_density(0.5)
        assert torch.equal(model(x), y_trained)
    for (_, _, mask), before in zip(weight_masks(model), trained, strict=True):
        assert torch.equal(mask.mask, before)


@pytest.mark.parametrize(("method", "options", "density", "match"), [
    ("floats", {"density": 0.5}, 0.6, "above the trained density 0.5"),
    ("floats", {"density": 0.5}, 0.0, "density must be a number in"),
    ("float", {}, 0.3, "no density knob"),
    ("film", {}, 0.3, "no density knob"),
])
def test_density_knob_refuses_what_it_cannot_do(method, options, density, match):
    _, model = small(method, **options)
    with pytest.raises(ValueError, match=match):
        model.set_density(density)


def test_masks_from_scores_exact_counts():
    scores = [torch.rand(10, 10), torch.rand(7), torch.rand(3, 3)]
    for scope in ("layer", "global"):
        masks = masks_from_scores(scores, 0.25, scope)
        assert [m.shape for m in masks] == [s.shape for s in scores]
        if scope == "layer":
            assert [int(m.sum()) for m in masks] == [25, 2, 2]
        else:
            assert sum(int(m.sum()) for m in masks) == round(0.25 * 116)
            flat = torch.cat([s.flatten() for s in scores])
            keep = torch.cat([m.flatten() for m in masks])
            assert flat[keep].min() >= flat[~keep].max()


def test_snip_masks_need_data_then_follow_saliency(tmp_path):
    plain, model = small("floats", density=0.2, prune="snip")
    x, y = torch.rand(4, 3, 32, 32), torch.randint(10, (4,))
    with pytest.raises(RuntimeError, match="prepare"):
        model(x)
    with pytest.raises(RuntimeError, match="prepare"):
        model.export(0.0)
    # The reference saliency |dL/dW * W| of the plain backbone (train mode, as the model),
    # measured with timm's zero-initialised last norms of residual branches opened (at that
    # point every score in a branch is exactly 0 and a mask would be an arbitrary tie-break).
    plain.train()
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.any():
                m.weight.fill_(1.0)
    F.cross_entropy(plain(x), y).backward()
    ref = plain.stages[2][0].conv1_kxk.conv
    saliency = (ref.weight.grad * ref.weight).abs().detach()
    assert (saliency > 0).float().mean() > 0.5  # an informative layer, not 0 >= 0

    model.train().set_lambda(0.4)
    stats = model.backbone.stem.bn.clean.running_mean.clone()
    snip_prune(model, x, y)
    assert model.lam == 0.4 and torch.equal(model.backbone.stem.bn.clean.running_mean, stats)
    assert abs(masked_density(model) - 0.2) <= 0.01
    assert all(not m.pending for _, _, m in weight_masks(model))
    conv = model.backbone.stages[2][0].conv1_kxk.conv
    mask = conv.parametrizations.weight[1].mask
    k = int(mask.sum())
    assert k == round(0.2 * mask.numel())
    assert saliency[mask].min() >= saliency[~mask].max()
    assert not torch.equal(mask, masks_from_scores([ref.weight.detach().abs()], 0.2)[0])
    assert torch.all(conv.parametrizations.weight.original[~mask] == 0)
    assert model.method.options.prune == "snip"
    oat_plugins.save(model, tmp_path / "snip.pt")  # rebuilt with pending masks, then loaded
    loaded = oat_plugins.load(tmp_path / "snip.pt", backbone=timm.create_model(
        SMALL, num_classes=10)).eval()
    assert loaded.method.options.prune == "snip"
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_weight_mask_is_generic():
    lin = nn.Linear(4, 3)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    parametrize.register_parametrization(lin, "weight", WeightMask(lin.weight.shape, mask))
    assert torch.all(lin.weight[~mask] == 0)
    assert torch.equal(lin.weight[mask], lin.parametrizations.weight.original[mask])
    assert count_nonzero(lin).nonzero == int(mask.sum()) + 3


# -- families -------------------------------------------------------------------------------
FAMILIES = ["resnet18", "resnet50", "efficientnet_b0", "tf_efficientnet_b0",
            "mobilenetv3_small_100", "regnetx_002", "densenet121", "convnext_atto",
            "vit_tiny_patch16_224"]


@pytest.mark.parametrize("name", FAMILIES)
def test_families(name):
    kwargs = {"num_classes": 10} | ({"img_size": 32} if name.startswith("vit") else {})
    backbone = timm.create_model(name, **kwargs).eval()
    n_plain = n_params(backbone)
    conv_types = {type(m) for m in backbone.modules() if isinstance(m, nn.Conv2d)}
    x = torch.rand(X)
    with torch.no_grad():
        reference = backbone(x)
    model = oat_plugins.wrap(backbone, "float", normalize=None).eval()
    # timm's conv subclasses keep their class (and so their forward)
    assert conv_types <= {type(m).__bases__[0] for m in conditioned(model)}
    with torch.no_grad():
        mixed = model.set_lambda(torch.tensor([1.0, 0.0]))(x)
        torch.testing.assert_close(mixed[1:], reference[1:], rtol=0, atol=1e-5)  # λ=0: backbone
        # λ = 1: noise and robust norm change the output (random-init EfficientNets give
        # logits of order 1e-5, hence relative tolerances)
        scale = float(mixed[:1].abs().max())
        assert (mixed[:1] - reference[:1]).abs().max() > 1e-3 * scale
        exported = model.export(1.0).eval()
        diff = (exported(x[:1]) - mixed[:1]).abs().max()
        assert diff <= 1e-4 and diff <= 1e-3 * scale
    assert n_params(exported) == n_plain and foreign_modules(exported) == []
    assert {type(m) for m in exported.modules() if isinstance(m, nn.Conv2d)} == conv_types


def test_snip_scores_residual_branches_that_timm_zero_initialises():
    """timm zero-initialises the last norm of every residual block: gradient saliency is then
    exactly 0 in every branch conv. The masks must still follow a real score there."""
    _, model = small("floats", density=0.3, prune="snip")
    zero_norm_branches = [m for m in model.backbone.modules()
                          if isinstance(m, DualNorm) and not m.clean.weight.any()]
    assert zero_norm_branches, "test backbone should zero-initialise residual norms"
    x, y = torch.rand(4, 3, 32, 32), torch.randint(10, (4,))
    with warnings_as_errors():
        snip_prune(model, x, y)  # no layer falls back: every score is informative
    for _, name, mask in weight_masks(model):
        assert abs(mask.density - 0.3) <= 0.02, name


def test_snip_re_pruning_never_revives_pruned_weights():
    _, model = small("floats", density=0.5)  # magnitude masks, zeroed weights
    before = [mask.mask.clone() for _, _, mask in weight_masks(model)]
    x, y = torch.rand(4, 3, 32, 32), torch.randint(10, (4,))
    snip_prune(model, x, y, density=0.3)
    for (mod, name, mask), old in zip(weight_masks(model), before, strict=True):
        assert not bool((mask.mask & ~old).any()), "a pruned weight came back"
        assert abs(mask.density - 0.3) <= 0.02
        effective = mod.parametrizations[name].original * mask.mask
        assert abs(float((effective != 0).float().mean()) - 0.3) <= 0.02
    with pytest.raises(ValueError, match="never revived"):
        snip_prune(model, x, y, density=0.6)


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# -- training recipes (issue 11: FLOAT as a dial) ----------------------------------------------
def _recipe_model(recipe: str) -> oat_plugins.ConditionalModel:
    """A tiny conv + GroupNorm net (per-sample forwards equal batched ones in train mode)
    wrapped with ``recipe``; the robust norm's affine is perturbed so the two branches
    differ, and α is large enough for the noise to matter."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model = oat_plugins.wrap(net, "float", normalize=None, recipe=recipe, alpha_init=2.0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DualNorm):
                module.robust.weight.normal_(1.0, 0.5)
                module.robust.bias.normal_(0.0, 0.5)
    return model.train()


def _recipe_context(model, lam):
    from oat_plugins.losses import LossContext, LossForward

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(len(lam), 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (len(lam),), generator=gen)
    adv = lam > 0
    x_adv = (x[adv] + 0.03 * torch.randn(x[adv].shape, generator=gen)).clamp(0, 1)
    return LossContext(model, x, y, lam, x_adv, LossForward(model))


def _ce_at(model, lam: float, x, y) -> torch.Tensor:
    with model.at(lam):
        return F.cross_entropy(model(x[None]), y[None])


def test_reference_recipe_loss_is_the_authors_formula():
    from oat_plugins.methods.float import ROBUST_CLEAN_LAMBDA

    model = _recipe_model("reference")
    lam = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5])
    ctx = _recipe_context(model, lam)
    loss, stats = model.method.training_loss(ctx)
    expected, k = torch.zeros(()), 0
    for i, li in enumerate(lam.tolist()):
        if li == 0:
            expected = expected + 0.5 * _ce_at(model, 0.0, ctx.x[i], ctx.y[i])
        else:  # clean image on the robust norm without noise, adversarial one at λ_i
            expected = expected + 0.5 * _ce_at(model, ROBUST_CLEAN_LAMBDA, ctx.x[i], ctx.y[i])
            expected = expected + 0.5 * _ce_at(model, li, ctx.x_adv[k], ctx.y[i])
            k += 1
    torch.testing.assert_close(loss, expected / len(lam), rtol=1e-4, atol=1e-5)
    assert stats["n_clean"] == 5 and stats["n_adv"] == 3
    # the robust clean term is not the λ = 0 model: the formula above tells them apart
    assert not torch.allclose(_ce_at(model, 0.0, ctx.x[1], ctx.y[1]),
                              _ce_at(model, ROBUST_CLEAN_LAMBDA, ctx.x[1], ctx.y[1]))


@pytest.mark.parametrize("recipe", ["oat", "extremes"])
def test_oat_and_extremes_recipes_use_oats_per_sample_formula(recipe):
    model = _recipe_model(recipe)
    lam = torch.tensor([0.0, 1.0, 0.2, 0.0, 0.4])
    ctx = _recipe_context(model, lam)
    loss, _ = model.method.training_loss(ctx)
    expected, k = torch.zeros(()), 0
    for i, li in enumerate(lam.tolist()):
        expected = expected + (1 - li) * _ce_at(model, li, ctx.x[i], ctx.y[i])
        if li > 0:
            expected = expected + li * _ce_at(model, li, ctx.x_adv[k], ctx.y[i])
            k += 1
    torch.testing.assert_close(loss, expected / len(lam), rtol=1e-4, atol=1e-5)


def test_recipe_samplers():
    from oat_plugins.samplers import DiscreteLambdaSampler

    oat = oat_plugins.get_method("float")(recipe="oat").default_sampler()
    assert type(oat) is DiscreteLambdaSampler and oat.lambdas == [0.0, 0.1, 0.2, 0.3, 0.4, 1.0]
    for recipe in ("reference", "extremes"):
        sampler = oat_plugins.get_method("float")(recipe=recipe).default_sampler()
        assert isinstance(sampler, ExtremesLambdaSampler)


def test_recipe_round_trips_through_save_load(tmp_path):
    model = oat_plugins.wrap(SMALL, "floats", model_kwargs={"num_classes": 10},
                             recipe="reference", norm_rule="switch")  # not the defaults
    oat_plugins.save(model, tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt")
    assert (loaded.method.options.recipe, loaded.method.options.norm_rule) == \
        ("reference", "switch")
    assert isinstance(loaded.method.default_sampler(), ExtremesLambdaSampler)


def test_default_recipe_is_the_documented_one():
    from pathlib import Path

    from oat_plugins.methods.float import DEFAULT_RECIPE, FloatOptions, FloatsOptions

    assert FloatOptions().recipe == FloatsOptions().recipe == DEFAULT_RECIPE == "oat"
    # each recipe brings its own norm rule unless one is given; the checkpoint keeps it
    assert FloatOptions().norm_rule == FloatsOptions().norm_rule == "interpolate"
    assert FloatOptions(recipe="reference").norm_rule == "switch"
    assert FloatOptions(recipe="oat", norm_rule="switch").norm_rule == "switch"
    assert FloatOptions(dual_norm=False).norm_rule == "switch"
    doc = (Path(__file__).resolve().parent.parent / "docs" / "methods" / "float.md").read_text()
    assert f"| `recipe` | `'{DEFAULT_RECIPE}'` |" in doc


@pytest.mark.parametrize("recipe", ["OAT", "dial", 1])
def test_bad_recipe_raises(recipe):
    with pytest.raises(ValueError, match="unknown FLOAT recipe"):
        oat_plugins.get_method("float")(recipe=recipe)


def _perturbed_bn_model(**options) -> oat_plugins.ConditionalModel:
    """``small`` float model whose two norm branches differ (affine and running stats)."""
    _, model = small("float", **options)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DualNorm):
                for branch, shift in ((module.clean, 0.0), (module.robust, 0.3)):
                    branch.weight.normal_(1.0, 0.2)
                    branch.bias.normal_(shift, 0.2)
                    branch.running_mean.normal_(0.0, 0.2)
                    branch.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_norm_rule_interpolate_mixes_the_branches_and_exports():
    switch = _perturbed_bn_model(norm_rule="switch")
    mixed = _perturbed_bn_model(norm_rule="interpolate")
    mixed.load_state_dict(switch.state_dict())
    x = torch.rand(X)
    norm = next(m for m in mixed.modules() if isinstance(m, DualNorm))
    feats = torch.randn(2, norm.clean.num_features, 4, 4)
    with torch.no_grad():
        with mixed.at(0.3):
            torch.testing.assert_close(norm(feats),
                                       norm.act(0.7 * norm.clean(feats) + 0.3 * norm.robust(feats)))
        for lam in (0.0, 1.0):  # the ends are those of the switch rule
            assert torch.equal(mixed.set_lambda(lam)(x), switch.set_lambda(lam)(x))
        outputs = {lam: mixed.set_lambda(lam)(x) for lam in (0.3, 0.7)}
        assert not torch.allclose(outputs[0.3], switch.set_lambda(0.3)(x), atol=1e-3)
    for lam, out in outputs.items():
        exported = mixed.export(lam).eval()
        assert foreign_modules(exported) == []
        with torch.no_grad():
            assert (exported(x) - out).abs().max() <= 1e-4


def test_norm_rule_interpolate_per_sample_equals_per_lambda_forwards():
    model = _perturbed_bn_model(norm_rule="interpolate")
    norm = next(m for m in model.modules() if isinstance(m, DualNorm))
    feats = torch.randn(4, norm.clean.num_features, 4, 4)
    lam = torch.tensor([0.0, 0.4, 1.0, 0.4])
    with torch.no_grad(), model.at(lam):
        joint = norm(feats)
    for i, li in enumerate(lam.tolist()):
        with torch.no_grad(), model.at(li):
            torch.testing.assert_close(joint[i:i + 1], norm(feats[i:i + 1]))


@pytest.mark.parametrize(("options", "match"), [
    ({"norm_rule": "mix"}, "unknown norm_rule"),
    ({"norm_rule": "interpolate", "dual_norm": False}, "needs dual_norm"),
])
def test_bad_norm_rule_raises(options, match):
    with pytest.raises(ValueError, match=match):
        oat_plugins.get_method("float")(**options)
