"""Values folded at a scalar λ (used under no_grad, inference mode and model.frozen()) are
never stale: every change of parameters, buffers, λ, dtype or mode is seen."""

from __future__ import annotations

import pytest
import torch
import torchattacks

import oat_plugins

METHODS = [m for m in oat_plugins.available_methods() if m != "toy-scale"]
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
