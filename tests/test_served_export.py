"""At a scalar λ in eval mode with constant weights, ``model(x)`` runs the model's cached
export: the same outputs and input gradients as the conditioned forward, never stale, and not
used where the conditioned forward must run."""

from __future__ import annotations

import pytest
import torch
import torchattacks

import oat_plugins
from oat_plugins.exits import MultiExitNet

METHODS = [m for m in oat_plugins.available_methods() if m != "toy-scale"]
X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4)


def build(method: str, **options) -> oat_plugins.ConditionalModel:
    torch.manual_seed(0)
    model = oat_plugins.wrap("test_byobnet", method, model_kwargs={"num_classes": 10},
                             **options)
    model.method.prepare(model, X, Y)
    model.serve_after = 1  # served from the first forward (the default waits, tested below)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the identity a fresh wrap starts at
        for p in model.parameters():
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(
                0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def served_and_unserved(model, lam):
    x = X.to(next(model.parameters()).dtype)
    with model.at(lam), torch.no_grad():
        served = model(x)
        module = model.served_export()
        model.serve_exports = False
        unserved = model(x)
        model.serve_exports = True
    return served, unserved, module


@pytest.fixture(params=[*METHODS, "film+exits"])
def model(request):
    if request.param == "film+exits":  # a conditioned model with exits and a router
        return build("film", exits="auto")
    return build(request.param)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_served_outputs_equal_the_conditioned_forward(model, lam):
    served, unserved, module = served_and_unserved(model, lam)
    assert module is not None
    expected = MultiExitNet if model.exits is not None else torch.nn.Module
    assert isinstance(module, expected)
    assert not any(isinstance(m, oat_plugins.ConditionalModel) for m in module.modules())
    torch.testing.assert_close(served, unserved, rtol=1e-5, atol=1e-6)
    with model.at(lam), torch.enable_grad():  # nothing folded, nothing served
        recomputed = model(X).detach()
    torch.testing.assert_close(served, recomputed, rtol=1e-5, atol=1e-6)


def test_the_served_module_is_reused_while_nothing_changes(model):
    with model.at(0.5), torch.no_grad():
        model(X)
        first = model.served_export()
        model(X)
        assert model.served_export() is first
    with model.at(0.5), model.frozen():
        assert model.served_export() is first
    with model.at(0.5), torch.inference_mode():  # inference tensors: a module of its own
        model(X)
        assert model.served_export() is not first


def changes(model):
    """Named changes after each of which the served module must be rebuilt."""
    def optimizer_step():
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with model.at(1.0):
            model.train()
            torch.nn.functional.cross_entropy(model(X), Y).backward()
            model.eval()
        opt.step()

    def load_other_state():
        state = model.state_dict()
        model.load_state_dict({k: v + 0.1 if isinstance(v, torch.Tensor)
                               and v.is_floating_point() else v for k, v in state.items()})

    @torch.no_grad()
    def change_running_statistics():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(0.5)

    @torch.no_grad()
    def flip_half_of_every_mask():  # floats' weight masks, smart's expert masks
        masks = [b for b in model.buffers() if b.dtype == torch.bool]
        for mask in masks:
            flat = mask.view(-1)
            flat[: flat.numel() // 2] = ~flat[: flat.numel() // 2]
        if not masks:
            change_running_statistics()

    return [optimizer_step, load_other_state, change_running_statistics,
            flip_half_of_every_mask]


@pytest.mark.parametrize("change", range(4))
def test_the_served_module_is_never_stale(model, change):
    before = served_and_unserved(model, 0.5)
    changes(model)[change]()
    served, unserved, module = served_and_unserved(model, 0.5)
    assert module is before[2]  # refreshed in place, not copied again
    assert not torch.equal(served, before[0])
    torch.testing.assert_close(served, unserved, rtol=1e-5, atol=1e-6)


def test_lambda_dtype_and_mode_changes_are_seen(model):
    at_zero = served_and_unserved(model, 0.0)[0]
    at_one, unserved, _ = served_and_unserved(model, 1.0)
    assert model.method_name == "multiexit" or not torch.equal(at_zero, at_one)  # no λ there
    torch.testing.assert_close(at_one, unserved, rtol=1e-5, atol=1e-6)
    model.to(torch.float64)
    served, unserved, module = served_and_unserved(model, 1.0)
    assert served.dtype == torch.float64 and next(module.parameters()).dtype == torch.float64
    torch.testing.assert_close(served, unserved)
    model.train()
    assert model._served._value is None  # never served in training
    with torch.no_grad():
        assert model.served_export() is None
    model.eval()
    served, unserved, again = served_and_unserved(model, 1.0)
    assert again is module  # kept for the next attack, refreshed
    torch.testing.assert_close(served, unserved)


def test_not_served_per_sample_with_parameter_gradients_or_when_opted_out(model):
    with model.at(torch.tensor([0.0, 0.5, 1.0, 1.0])), torch.no_grad():
        assert model.served_export() is None
    with model.at(0.5):
        assert model.served_export() is None  # autograd on, parameters not frozen
    model.serve_exports = False
    with model.at(0.5), torch.no_grad():
        assert model.served_export() is None


def test_resampled_noise_is_never_served():
    model = build("float", noise="resample")
    with model.at(1.0), torch.no_grad():
        assert model.served_export() is None
        assert not torch.equal(model(X), model(X))  # fresh noise each forward


def test_pending_masks_run_the_conditioned_forward():
    torch.manual_seed(0)
    model = oat_plugins.wrap("test_byobnet", "floats", model_kwargs={"num_classes": 10},
                             prune="snip").eval()
    model.serve_after = 1
    with model.at(1.0), torch.no_grad():
        assert model.served_export() is None
        with pytest.raises(RuntimeError, match="not been chosen yet"):
            model(X)  # the conditioned forward's own error
        model.method.prepare(model, X, Y)
        assert model.served_export() is not None


def test_input_gradients_and_attacks_equal_the_conditioned_ones(model):
    x = X.clone().requires_grad_(True)
    grads, advs = [], []
    for serve in (True, False):
        model.serve_exports = serve
        with model.at(1.0), model.frozen():
            assert (model.served_export() is not None) == serve
            torch.nn.functional.cross_entropy(model(x), Y).backward()
            if serve:
                assert all(p.grad is None for p in model.parameters())
            grads.append(x.grad)
            x.grad = None
            advs.append(torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=2,
                                         random_start=False)(X, Y))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(advs[0], advs[1])
    assert float((advs[0] - X).abs().max()) > 0


def test_clear_fold_caches_drops_the_served_export_and_sees_new_hooks():
    model = build("film")
    calls = []
    with model.at(0.5), torch.no_grad():
        model(X)
        first = model.served_export()
        model.backbone.stem.register_forward_hook(lambda *_: calls.append(1))
        model(X)
        assert calls == []  # the held copy was made before the hook
        model.clear_fold_caches()
        model(X)
        assert model.served_export() is not first and calls == [1]


@pytest.mark.parametrize("method", ["float", "film+exits"])
def test_training_attacks_serve_one_module_refreshed_in_place(method):
    """Each training attack (in model.frozen()) runs the served module from its first forward;
    the model is copied once, later steps (new weights) write into that copy, and the
    adversarial examples are those of the conditioned layers."""
    from oat_plugins.model import SERVE_AFTER
    from oat_plugins.train import adversarial_examples
    model = build("film", exits="auto") if method == "film+exits" else build(method)
    model.serve_after = SERVE_AFTER
    copies = []
    fold = model._fold_backbone
    model._fold_backbone = lambda lam: copies.append(lam) or fold(lam)
    attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=3, random_start=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    held = []
    for step in range(3):
        model.train()
        torch.manual_seed(step)
        x_adv = adversarial_examples(model, attack, X, Y, torch.ones(4))  # eval mode, frozen
        held.append(model._serving[False].module)  # train() kept it for the next attack
        model.serve_exports = False
        torch.manual_seed(step)
        with model.at(1.0), model.frozen():
            reference = attack(X, Y)
        model.serve_exports = True
        torch.testing.assert_close(x_adv, reference, rtol=1e-5, atol=1e-6)
        model.train()
        with model.at(1.0):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x_adv), Y).backward()
        opt.step()
    assert copies == [1.0] and held[0] is not None and all(m is held[0] for m in held)


def test_a_module_that_cannot_be_refreshed_is_not_copied_once_per_attack(monkeypatch):
    """When the folded tensors do not match the held module's (e.g. a method's own export),
    one attack copies the model again, and later attacks wait for serve_after forwards."""
    import oat_plugins.model as model_module
    from oat_plugins.model import SERVE_AFTER
    from oat_plugins.train import adversarial_examples
    model = build("float")
    model.serve_after = SERVE_AFTER
    copies = []
    fold = model._fold_backbone
    model._fold_backbone = lambda lam: copies.append(lam) or fold(lam)
    folded_state = model_module.folded_state
    monkeypatch.setattr(model_module, "folded_state",
                        lambda root: dict(list(folded_state(root).items())[1:]))
    attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(4):
        adversarial_examples(model, attack, X, Y, torch.ones(4))
        model.train()
        with model.at(1.0):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    assert copies == [1.0, 1.0] and not model._serving[False].refreshable


def test_outside_an_attack_the_export_is_served_after_serve_after_unchanged_forwards():
    from oat_plugins.model import SERVE_AFTER
    model = build("float")
    model.serve_after = SERVE_AFTER
    with model.at(1.0), torch.no_grad():
        for _ in range(SERVE_AFTER - 1):
            model(X)
        assert model._served._value.module is None
        model(X)
        assert model._served._value.module is not None
