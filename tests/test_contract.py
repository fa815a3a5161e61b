"""The method contract: every registered method (and an out-of-tree one registered here) must
keep the invariants of docs/architecture.md on a BN CNN, a LayerNorm CNN and a ViT.

A new method gets these tests by being registered. Each model is perturbed first, so its
output really depends on λ (checked), and no invariant holds vacuously.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import timm
import torch
import torchattacks
from torch import nn

import oat_plugins
from oat_plugins.exits import MultiExitNet
from oat_plugins.layers import ConditionedParametrization
from oat_plugins.samplers import ExtremesLambdaSampler
from oat_plugins.surgery import NothingToConditionError, foreign_modules, parametrize_weights
from oat_plugins.train import oat_loss


# -- an out-of-tree method, written as a user would, with the public API only -------------
class _Scale(ConditionedParametrization):
    """W ↦ W·(1 + s·λ), s learnable per layer (0 at start: identity at every λ)."""

    def __init__(self, condition):
        super().__init__(condition)
        self.s = nn.Parameter(torch.zeros(()))

    def forward(self, weight):
        return weight * (1 + self.s * self.condition.lam)


@dataclass
class ToyOptions:
    """No options."""


@oat_plugins.register_method
class ToyScale(oat_plugins.Method):
    name = "toy-scale"
    Options = ToyOptions
    lambda_groups = True  # a weight that depends on λ: one forward per λ group
    identity_at_zero = True

    def apply(self, backbone, condition, extras):
        done = parametrize_weights(
            backbone, lambda _, m: isinstance(m, (nn.Conv2d, nn.Linear)),
            lambda *_: _Scale(condition), "W·(1 + s·λ)")
        if not done:
            raise NothingToConditionError("toy-scale needs a conv or linear layer")
        return done

    def default_sampler(self):
        return ExtremesLambdaSampler()


# -- models ---------------------------------------------------------------------------------
FAMILIES = {
    "test_byobnet": {},  # BatchNorm CNN with residual blocks (timm zero-inits last norms)
    "convnext_atto": {"depths": (1, 1, 1, 1), "dims": (16, 24, 32, 48)},  # LayerNorm2d + LN
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2},
}
METHODS = oat_plugins.available_methods()
CASES = [(m, f) for m in METHODS for f in FAMILIES]
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.utils.data.TensorDataset(  # calibrates the exits of multi-exit models
    torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.zeros(32))
LAM = torch.tensor([0.0, 0.3, 1.0, 0.0])


def build(method: str, family: str) -> oat_plugins.ConditionalModel:
    torch.manual_seed(0)
    model = oat_plugins.wrap(family, method, model_kwargs={"num_classes": 10,
                                                           **FAMILIES[family]})
    model.method.prepare(model, X, torch.arange(4))  # data-driven set-up where pending
    model = perturb(model).eval()
    if model.exits is not None:  # samples leave at every exit, so routing is exercised
        n = len(model.exit_thresholds)
        model.calibrate(HELD_OUT, shares=[1 / n] * n)
    return model


@torch.no_grad()
def perturb(model: nn.Module) -> nn.Module:
    """Move every float parameter and norm statistic away from its initial value (relative,
    so logits stay in range), so that conditioning pieces that start at identity matter."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        shift = 0.1 if not p.any() else 0.02  # zero-initialised pieces (FiLM, scales) show
        p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(
            shift * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("running_var"):
            b.mul_(1 + torch.rand(b.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def case(request):
    method, family = request.param
    return method, family, build(method, family)


def at(model, lam, x=X):
    with model.at(lam), torch.no_grad():
        return model(x)


# -- the invariants -------------------------------------------------------------------------
def test_output_depends_on_lambda(case):
    _, _, model = case
    clean, robust = at(model, 0.0), at(model, 1.0)
    if not model.replacements:  # a method that conditions nothing (multiexit): no λ effect
        assert torch.equal(clean, robust)
        return
    assert float((clean - robust).abs().max()) > 1e-2 * float(clean.abs().max())


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_export_equals_model_and_is_plain(case, lam):
    method, family, model = case
    plain = model.export(lam).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(X), at(model, lam), rtol=1e-4, atol=1e-4)
    backbone = plain[-1] if isinstance(plain, nn.Sequential) else plain
    exits = isinstance(backbone, MultiExitNet)  # with exits: a plain backbone and heads in it
    assert exits == (model.exits is not None)
    parts = [backbone.backbone, backbone.heads] if exits else [plain]
    assert all(foreign_modules(part) == [] for part in parts)
    backbone = backbone.backbone if exits else backbone
    reference = timm.create_model(family, num_classes=10, **FAMILIES[family])
    assert type(backbone) is type(reference)
    assert sum(p.numel() for p in backbone.parameters()) == sum(
        p.numel() for p in reference.parameters())


def test_save_load_is_exact(case, tmp_path):
    _, _, model = case
    model.set_lambda(0.3)
    oat_plugins.save(model, tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt")
    assert loaded.lam == 0.3
    for lam in (0.0, 0.3, 1.0):
        assert torch.equal(at(loaded, lam), at(model, lam))


def test_mixed_lambda_batch_equals_per_lambda_forwards(case):
    _, _, model = case
    mixed = at(model, LAM)
    for i, lam in enumerate(LAM.tolist()):
        torch.testing.assert_close(mixed[i:i + 1], at(model, lam, X[i:i + 1]),
                                   rtol=1e-4, atol=1e-5)


def test_forward_is_deterministic(case):
    _, _, model = case
    assert torch.equal(at(model, 0.3), at(model, 0.3))


def test_at_restores_a_per_sample_lambda_exactly(case):
    _, _, model = case
    model.set_lambda(LAM)
    with model.at(0.7):
        assert model.lam == 0.7
    assert torch.equal(model.lam, LAM)
    model.set_lambda(0.0)


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_zero_where_declared(method):
    family = "test_byobnet"
    torch.manual_seed(0)
    backbone = timm.create_model(family, num_classes=10).eval()
    with torch.no_grad():
        for m in backbone.modules():  # open timm's zero-init norms so every block matters
            if isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
    expected = backbone(X)
    model = oat_plugins.wrap(backbone, method, normalize=None)
    if model.method.identity_at_zero:
        torch.testing.assert_close(at(model.eval(), 0.0), expected, rtol=1e-5, atol=1e-5)
    else:  # the declaration is honest: e.g. a sparsity mask changes the function at once
        assert not torch.allclose(at(model.eval(), 0.0), expected, rtol=1e-3, atol=1e-3)


def test_training_step_reaches_conditioning_parameters(case):
    _, _, model = case
    model.train()
    x = torch.cat([X, X.flip(0)])  # two samples per λ group (batch norms need more than one)
    lam, y = torch.cat([LAM, LAM]), torch.arange(8) % 10
    loss, stats = oat_loss(model, x, y, lam, torchattacks.FGSM(model, eps=2 / 255))
    loss.backward()
    model.eval()
    assert torch.isfinite(loss) and stats["n_adv"] == 4
    grads = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    conditioning = [g for n, g in grads.items()  # FiLM, robust norms, weight conditioning,
                    if ".post." in n or ".robust." in n  # exit heads
                    or ("parametrizations" in n and not n.endswith(".original"))
                    or ".oat_exits." in n]
    assert conditioning and any(g is not None and bool(g.abs().sum() > 0) for g in conditioning)


@pytest.mark.parametrize("attack", [
    lambda m: torchattacks.PGD(m, eps=4 / 255, alpha=2 / 255, steps=2),
    lambda m: torchattacks.APGD(m, eps=4 / 255, steps=2),
    lambda m: torchattacks.Square(m, eps=4 / 255, n_queries=5),
], ids=["pgd", "apgd", "square"])
def test_torchattacks_run_at_a_lambda(case, attack):
    _, _, model = case
    with model.at(0.7):
        adv = attack(model)(X, at(model, 0.7).argmax(1))
    assert adv.shape == X.shape and float((adv - X).abs().max().detach()) <= 4 / 255 + 1e-6
