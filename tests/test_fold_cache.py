"""Values folded at a scalar λ (used under no_grad, inference mode and model.frozen()) are
never stale: every change of parameters, buffers, λ, dtype or mode is seen."""

from __future__ import annotations

import pytest
import torch
import torchattacks

import oat_plugins

# the methods that condition weights (multiexit conditions nothing: its output does not
# depend on λ; the out-of-tree toy method has no fold cache)
METHODS = [m for m in oat_plugins.available_methods() if m not in ("toy-scale", "multiexit")]
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4)


def build(method: str, seed: int = 0) -> oat_plugins.ConditionalModel:
    torch.manual_seed(seed)
    model = oat_plugins.wrap("test_byobnet", method, model_kwargs={"num_classes": 10})
    model.method.prepare(model, X, Y)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(
                0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def recomputed(model, lam):
    """The output with every conditioned piece recomputed (gradients wanted: no cache)."""
    with model.at(lam), torch.enable_grad():
        return model(X.to(next(model.parameters()).dtype)).detach()


def cached(model, lam):
    with model.at(lam), torch.no_grad():
        return model(X.to(next(model.parameters()).dtype))


@pytest.fixture(params=METHODS)
def model(request):
    return build(request.param)


def test_cached_equals_recomputed_and_lambda_changes_are_seen(model):
    for lam in (0.3, 1.0, 0.3, 0.0):
        torch.testing.assert_close(cached(model, lam), recomputed(model, lam),
                                   rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached(model, 0.0), cached(model, 1.0), atol=1e-4)


def test_inference_mode_values_equal_recomputed_ones(model):
    for lam in (0.3, 1.0):
        with model.at(lam), torch.inference_mode():
            served = model(X)
            again = model(X)
        torch.testing.assert_close(served, recomputed(model, lam), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again, served, rtol=0, atol=0)
        torch.testing.assert_close(cached(model, lam), served, rtol=0, atol=0)


def test_an_optimizer_step_is_seen(model):
    before = cached(model, 0.7)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with model.at(0.7):
        torch.nn.functional.cross_entropy(model(X), Y).backward()
    optimizer.step()
    model.eval()
    after = cached(model, 0.7)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, recomputed(model, 0.7), rtol=1e-5, atol=1e-6)


def test_load_state_dict_is_seen(model):
    cached(model, 0.7)
    other = build(model.method_name, seed=5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(cached(model, 0.7), cached(other, 0.7), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached(model, 0.7), recomputed(model, 0.7), rtol=1e-5, atol=1e-6)


def test_dtype_and_device_moves_are_seen(model):
    cached(model, 0.7)
    model.to(torch.float64)
    out = cached(model, 0.7)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, recomputed(model, 0.7))
    model.to(torch.float32)
    torch.testing.assert_close(cached(model, 0.7), recomputed(model, 0.7), rtol=1e-5, atol=1e-6)


def test_train_mode_never_uses_the_cache(model):
    cached(model, 1.0)
    model.train()
    stats = {k: v.clone() for k, v in model.named_buffers() if "running_mean" in k}
    with model.at(1.0), torch.no_grad():
        model(X)
    changed = [k for k, v in model.named_buffers() if k in stats and not torch.equal(v, stats[k])]
    assert changed, "train-mode batch statistics must update the model's own norms"


def test_data_writes_need_clear_fold_caches(model):
    cached(model, 1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5)  # .data bypasses version counters
    model.clear_fold_caches()
    torch.testing.assert_close(cached(model, 1.0), recomputed(model, 1.0), rtol=1e-5, atol=1e-6)


def test_frozen_gives_input_gradients_and_no_parameter_gradients(model):
    x = X.clone().requires_grad_(True)
    with model.at(1.0):
        torch.nn.functional.cross_entropy(model(x), Y).backward()
        reference = x.grad.clone()
        model.zero_grad(set_to_none=True)
        x.grad = None
        with model.frozen():
            torch.nn.functional.cross_entropy(model(x), Y).backward()
    torch.testing.assert_close(x.grad, reference, rtol=1e-4, atol=1e-7)
    conditioning = [p.grad for n, p in model.named_parameters()
                    if ".post." in n or "alpha" in n]
    assert all(g is None for g in conditioning)
    with model.at(1.0), model.frozen():
        adv = torchattacks.PGD(model, eps=4 / 255, alpha=2 / 255, steps=2)(X, Y)
    assert float((adv - X).abs().max()) <= 4 / 255 + 1e-6


def parametrized_weights(model):
    return [module for module in model.modules()
            if torch.nn.utils.parametrize.is_parametrized(module, "weight")]


@pytest.mark.parametrize("method", ["float", "floats", "smart"])
def test_a_whole_parametrization_chain_is_folded_once_per_lambda(method):
    """W + α·λ·η then ⊙ mask (floats), W ⊙ M(λ) (smart): one tensor per λ, not per forward,
    under no_grad and inside frozen() (the attack's setting, gradients enabled)."""
    model = build(method)
    layers = parametrized_weights(model)
    assert layers
    for scope in (torch.no_grad, torch.inference_mode, model.frozen):
        with model.at(0.7), scope():
            first = [layer.weight for layer in layers]
            assert all(layer.weight is w for layer, w in zip(layers, first, strict=True))
            assert not any(w.requires_grad for w in first)
    with model.at(0.7):  # gradients wanted: recomputed, with a graph to the parameters
        assert all(layer.weight.requires_grad for layer in layers)


def test_a_new_weight_mask_is_seen():
    model = build("floats")
    cached(model, 0.7)
    from oat_plugins.layers.weight_mask import weight_masks
    for _, _, mask in weight_masks(model):
        mask.set_mask(~mask.mask)
    torch.testing.assert_close(cached(model, 0.7), recomputed(model, 0.7), rtol=1e-5, atol=1e-6)


def test_new_expert_masks_are_seen():
    model = build("smart")
    before = cached(model, 1.0)
    from oat_plugins.layers.expert_masks import expert_masks
    for _, _, masks in expert_masks(model):
        masks.set_masks(masks.clean, masks.clean)  # the adversarial path now uses M_c
    after = cached(model, 1.0)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, recomputed(model, 1.0), rtol=1e-5, atol=1e-6)


def test_a_mask_after_freshly_drawn_noise_is_never_served_stale():
    """With noise='resample' the mask's input is a new tensor every forward: two forwards
    differ (a cache keyed on a reused address would repeat the first draw)."""
    torch.manual_seed(0)
    model = oat_plugins.wrap("test_byobnet", "floats", noise="resample",
                             model_kwargs={"num_classes": 10}).eval()
    model.method.prepare(model, X, Y)
    layer = parametrized_weights(model)[0]
    with model.at(1.0), torch.no_grad():
        draws = [layer.weight.clone() for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def training_attack_inputs(method):
    model = build(method)
    lam = model.method.default_sampler()(4, torch.Generator().manual_seed(3))
    lam = torch.where(lam > 0, lam, torch.full_like(lam, 0.5))  # the attacked samples: λ > 0
    attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=3, random_start=True)
    return model, lam, attack


@pytest.mark.parametrize("method", METHODS)
def test_the_training_attack_computes_conditioned_pieces_once_per_attack(method):
    """Inside train.adversarial_examples each conv sees one weight tensor per λ group for all
    attack steps, and each FiLM generator runs once per attack."""
    from oat_plugins.train import adversarial_examples
    model, lam, attack = training_attack_inputs(method)
    weights_seen = {}
    film_runs = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(
                lambda m, _, name=name: weights_seen.setdefault(
                    (name, float(model.lam) if model.condition.is_scalar else -1), []
                ).append(m.weight))
        if isinstance(module, oat_plugins.layers.FiLM):
            module.net.register_forward_hook(lambda *_: film_runs.append(1))
    adversarial_examples(model, attack, X, Y, lam)
    assert weights_seen and all(len(ws) == 3 for ws in weights_seen.values())  # 3 steps
    assert all(all(w is ws[0] for w in ws) for ws in weights_seen.values())
    n_films = sum(isinstance(m, oat_plugins.layers.FiLM) for m in model.modules())
    assert len(film_runs) == n_films  # zero for the weight methods


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_at_one_lambda_is_attacked_and_trained_at_that_scalar_lambda(method):
    """One λ for the whole batch (fine-tuning at λ = 1, the equal-work benchmark rows): the
    attack and the training forward run at the scalar λ, where the conditioned pieces are
    computed once for the batch, and find the same examples, loss and gradients as at the
    per-sample λ."""
    from oat_plugins.losses import LossForward
    from oat_plugins.train import adversarial_examples
    model = build(method)
    lam = torch.full((4,), 0.7)
    attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=3, random_start=True)
    scalar_seen = []
    model.backbone.register_forward_pre_hook(
        lambda *_: scalar_seen.append(model.condition.is_scalar))
    torch.manual_seed(11)
    x_adv = adversarial_examples(model, attack, X, Y, lam)
    assert scalar_seen and all(scalar_seen)
    torch.manual_seed(11)
    with model.at(lam):  # the per-sample λ, nothing frozen
        reference = attack(X, Y)
    torch.testing.assert_close(x_adv, reference)

    def per_sample_outputs():
        with model.at(lam):
            return model.training_outputs(x_adv)

    model.train()
    losses, grads = [], []
    for run in (lambda: LossForward(model)(x_adv, lam), per_sample_outputs):
        scalar_seen.clear()
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(run(), Y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        assert scalar_seen and (all(scalar_seen) or len(losses) == 2)
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads, strict=True):  # float32 sums in another order: 1e-5 of the scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_the_cached_training_attack_finds_the_same_examples(method):
    from oat_plugins.train import adversarial_examples
    model, lam, attack = training_attack_inputs(method)
    torch.manual_seed(11)
    cached_adv = adversarial_examples(model, attack, X, Y, lam)
    reference = torch.empty_like(X)
    torch.manual_seed(11)
    if model.method.lambda_groups:
        for value in lam.unique().tolist():  # the same group order, nothing folded
            idx = torch.nonzero(lam == value).flatten()
            with model.at(value):
                reference[idx] = attack(X[idx], Y[idx])
    else:
        with model.at(lam):
            reference = attack(X, Y)
    torch.testing.assert_close(cached_adv, reference)
