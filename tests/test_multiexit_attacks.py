"""The multi-exit attacks (oat_plugins.attacks.multiexit): single-exit, average, max-average,
routing and slowdown PGD, on a small real multi-exit module."""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn
from torch.utils.data import Subset

import oat_plugins
from oat_plugins.attacks import (
    MULTIEXIT_ATTACKS,
    AverageExitPGD,
    MaxAverageExitPGD,
    RoutingPGD,
    SingleExitPGD,
    SlowdownPGD,
    available_attacks,
    build_attack,
    queries_whole_batch,
)
from oat_plugins.attacks.multiexit import exit_cross_entropy, exit_entropy
from oat_plugins.data import load_dataset
from oat_plugins.train import TrainConfig, adversarial_examples, fit, make_attack

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import bundled_images  # noqa: E402

EPS = 8 / 255


class ThreeExits(nn.Module):
    """Three conv stages, an exit after each (the last is the "backbone head"), and an entropy
    router: a sample leaves at the first exit whose softmax entropy is below its threshold.
    ``routes`` counts the router's calls, ``modes`` records the training flag of each
    ``exit_logits`` call."""

    def __init__(self, thresholds: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        widths = (3, 8, 16, 16)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w, 10))
            for w in widths[1:])
        self.thresholds = list(thresholds)
        self.routes = 0
        self.modes: list[bool] = []

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.modes.append(self.training)
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            out.append(4 * head(x))  # confident enough that the entropy router has room
        return out

    def route(self, exit_logits: list[torch.Tensor]) -> torch.Tensor:
        self.routes += 1
        below = exit_entropy(exit_logits[:-1]) < torch.tensor(self.thresholds)[:, None]
        last = torch.full((1, below.shape[1]), True)
        return torch.cat([below, last]).int().argmax(0)  # the first exit that accepts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.exit_logits(x)
        picked = self.route(logits)
        return torch.stack(logits)[picked, torch.arange(x.shape[0])]


@pytest.fixture(scope="module")
def trained():
    """Every exit trained a little on bundled images, so that the exits' confidence depends on
    the image (at initialisation every image gives nearly the same logits)."""
    torch.manual_seed(0)
    net = ThreeExits()
    x, y = bundled_images(512, "train")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(40):
        batch = torch.randint(0, x.shape[0], (64,))
        loss = exit_cross_entropy(net.exit_logits(x[batch]), y[batch]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@pytest.fixture
def model(trained):
    return copy.deepcopy(trained)


@pytest.fixture
def images():
    return bundled_images(16)


def _routed_at(model, x, exit_index):
    """``model`` with thresholds that send every sample of ``x`` to ``exit_index``."""
    everything, nothing = float("inf"), float("-inf")
    model.thresholds = [everything if i == exit_index else nothing for i in range(2)]
    return model


def test_every_multiexit_attack_is_registered_and_stays_in_the_ball(model, images):
    x, y = images
    assert list(MULTIEXIT_ATTACKS) == [n for n in available_attacks() if n in MULTIEXIT_ATTACKS]
    assert len(MULTIEXIT_ATTACKS) == 5
    model.train()
    for name, cls in MULTIEXIT_ATTACKS.items():
        attack = build_attack(name, model, eps=EPS, steps=2)
        assert isinstance(attack, torchattacks.attack.Attack) and type(attack) is cls
        assert not attack.targeted
        adv = attack(x, y)
        assert adv.shape == x.shape and float(adv.min()) >= 0 and float(adv.max()) <= 1
        size = (adv - x).abs().amax()
        assert 0 < float(size) <= EPS * (1 + 1e-5), name
        assert model.training, f"{name} did not restore train mode"


def test_attacks_run_in_eval_mode_unless_asked(model, images):
    x, y = images
    model.train()
    model.modes.clear()
    AverageExitPGD(model, steps=2)(x, y)
    assert model.modes == [False, False] and model.training
    model.modes.clear()
    attack = AverageExitPGD(model, steps=2)
    attack.set_model_training_mode(model_training=True)
    attack(x, y)
    assert model.modes == [True, True]


def _objective_gain(attack, model, x, y):
    adv_images = attack(x, y)
    with torch.no_grad():
        return (attack.objective(model.exit_logits(x), y),
                attack.objective(model.exit_logits(adv_images), y))


@pytest.mark.parametrize("cls", [SingleExitPGD, AverageExitPGD, MaxAverageExitPGD, RoutingPGD,
                                 SlowdownPGD])
def test_each_attack_increases_its_objective(model, images, cls):
    x, y = images
    model.thresholds = [1.5, 1.5]  # some samples leave early: routing varies per sample
    attack = cls(model, eps=EPS, alpha=EPS / 4, steps=10)
    clean, adv = _objective_gain(attack, model, x, y)
    assert adv.shape == (x.shape[0],)
    assert float(adv.mean()) > float(clean.mean()) + 0.1


def test_single_exit_attacks_the_exit_it_names(model, images):
    x, y = images
    gains = []
    for k in range(3):
        torch.manual_seed(0)
        adv = SingleExitPGD(model, eps=EPS, alpha=EPS / 4, steps=10, exit=k)(x, y)
        with torch.no_grad():
            gains.append(exit_cross_entropy(model.exit_logits(adv), y)
                         - exit_cross_entropy(model.exit_logits(x), y))
    for k, gain in enumerate(gains):
        # the attacked exit gains more CE than the other attacks give it
        others = [float(gains[j][k].mean()) for j in range(3) if j != k]
        assert float(gain[k].mean()) > max(others), (k, [g.mean(1) for g in gains])
    with pytest.raises(ValueError, match="exit 3 does not exist: the model has 3 exits"):
        SingleExitPGD(model, steps=1, exit=3)(x, y)
    assert torch.equal(_same_seed(SingleExitPGD(model, steps=2, exit=-1), x, y),
                       _same_seed(SingleExitPGD(model, steps=2, exit=2), x, y))


def _same_seed(attack, x, y, seed=0):
    torch.manual_seed(seed)
    return attack(x, y)


@pytest.mark.parametrize("exit_index", [0, 1, 2])
def test_routing_attacks_the_exit_the_router_picks(model, images, exit_index):
    x, y = images
    _routed_at(model, x, exit_index)
    routing = _same_seed(RoutingPGD(model, steps=3), x, y)
    assert torch.equal(routing, _same_seed(SingleExitPGD(model, steps=3, exit=exit_index), x, y))
    other = (exit_index + 1) % 3
    assert not torch.equal(routing, _same_seed(SingleExitPGD(model, steps=3, exit=other), x, y))


def test_routing_is_recomputed_at_every_step(model, images):
    x, y = images
    model.thresholds = [1.5, 1.5]
    model.routes = 0
    RoutingPGD(model, steps=4)(x, y)
    assert model.routes == 4


def test_slowdown_pushes_samples_to_later_exits(model, images):
    x, _ = images
    with torch.no_grad():
        entropy = exit_entropy(model.exit_logits(x))
    model.thresholds = entropy[:2].median(1).values.tolist()  # half leave at each early exit
    with torch.no_grad():
        clean_exit = model.route(model.exit_logits(x)).float().mean()
    adv = SlowdownPGD(model, eps=EPS, alpha=EPS / 4, steps=10)(x)  # no labels needed
    with torch.no_grad():
        adv_logits = model.exit_logits(adv)
        adv_exit = model.route(adv_logits).float().mean()
    assert float(clean_exit) < 1.5
    assert float(adv_exit) > float(clean_exit) + 0.3
    assert bool((exit_entropy(adv_logits[:2]).mean(1) > entropy[:2].mean(1)).all())


def test_max_average_keeps_per_sample_the_candidate_with_the_largest_summed_ce(model, images):
    x, y = images
    torch.manual_seed(0)
    chosen = MaxAverageExitPGD(model, eps=EPS, steps=3)(x, y)
    torch.manual_seed(0)  # the same random starts, drawn in the same order (exit 0, 1, 2)
    candidates = torch.stack([SingleExitPGD(model, eps=EPS, steps=3, exit=k)(x, y)
                              for k in range(3)])
    with torch.no_grad():
        scores = torch.stack([exit_cross_entropy(model.exit_logits(c), y).sum(0)
                              for c in candidates])
    best = scores.argmax(0)
    assert len(set(best.tolist())) > 1  # the choice really is per sample
    assert torch.equal(chosen, candidates[best, torch.arange(x.shape[0])])


def test_labels_are_required_except_for_slowdown(model, images):
    x, _ = images
    with pytest.raises(ValueError, match="AverageExitPGD maximises a cross-entropy: pass the"):
        AverageExitPGD(model, steps=1)(x)
    with pytest.raises(ValueError, match="MaxAverageExitPGD maximises a cross-entropy"):
        MaxAverageExitPGD(model, steps=1)(x)


def test_normalization_is_applied_to_the_exits_like_torchattacks(model, images):
    x, y = images
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    attack = AverageExitPGD(model, eps=EPS, steps=2)
    attack.set_normalization_used(mean, std)

    def normalize(t):
        return (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    class Normalized(nn.Module):  # the same model taking [0, 1] images
        def __init__(self):
            super().__init__()
            self.inner = model

        def exit_logits(self, t):
            return model.exit_logits(normalize(t))

    torch.manual_seed(0)
    adv = attack(normalize(x), y)  # torchattacks: normalized in, normalized out
    expected = _same_seed(AverageExitPGD(Normalized(), eps=EPS, steps=2), x, y)
    assert torch.allclose(adv, normalize(expected), atol=1e-5)


def test_a_model_without_exits_is_a_clear_error():
    plain = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    for name in MULTIEXIT_ATTACKS:
        with pytest.raises(TypeError, match=r"attacks a multi-exit model \(wrap\(backbone, "
                                            r"method='multiexit'\), exits='auto', or any module "
                                            r"with exit_logits\(\).*\), but this Sequential "
                                            r"has no exits$"):
            build_attack(name, plain, steps=1)

    class NoRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def exit_logits(self, t):
            return [self.linear(t)]

    with pytest.raises(TypeError, match=r"RoutingPGD .* with exit_logits\(\) and route\(\)\), "
                                        "but this NoRouter has no exits"):
        RoutingPGD(NoRouter())
    AverageExitPGD(NoRouter())  # a router is only needed to attack it
    with pytest.raises(TypeError, match="exit must be an exit index"):
        SingleExitPGD(ThreeExits(), exit=1.0)
    with pytest.raises(ValueError, match="at least one early exit"):
        SlowdownPGD(NoRouter(), steps=1)(torch.rand(2, 2))


def test_cross_entropy_and_entropy_helpers(model, images):
    x, y = images
    with torch.no_grad():
        logits = model.exit_logits(x)
    ce = exit_cross_entropy(logits, y)
    assert ce.shape == (3, x.shape[0])
    assert torch.allclose(ce[1], F.cross_entropy(logits[1], y, reduction="none"))
    uniform = exit_entropy([torch.zeros(2, 10)])
    assert torch.allclose(uniform, torch.full((1, 2), float(torch.log(torch.tensor(10.0)))))


# -- on the package's own multi-exit model -------------------------------------------------------
TINY = {"num_classes": 10, "channels": (8, 16, 16, 16), "stem_width": 8}


def test_attacks_run_on_a_wrapped_multiexit_model_and_need_its_exits(images):
    x, y = images
    torch.manual_seed(0)
    model = oat_plugins.wrap("resnet10t", "multiexit", model_kwargs=TINY).eval()
    n_exits = len(model.exit_logits(x[:1]))
    assert n_exits >= 2
    for name in MULTIEXIT_ATTACKS:
        adv = build_attack(name, model, steps=2)(x, y)
        size = (adv - x).abs().amax()
        assert 0 < float(size) <= EPS * (1 + 1e-5) and float(adv.min()) >= 0, name
    plain = oat_plugins.wrap("resnet10t", "film", model_kwargs=TINY)  # exit_logits, no exits
    with pytest.raises(TypeError, match="but this ConditionalModel has no exits"):
        build_attack("routing-pgd", plain)


def test_training_uses_a_multiexit_attack_by_name(tmp_path):
    torch.manual_seed(0)
    model = oat_plugins.wrap("resnet10t", "multiexit", model_kwargs=TINY)
    data = Subset(load_dataset("bundled", "train"), range(16))
    config = TrainConfig(epochs=1, batch_size=8, steps=1, max_steps=1,
                         attack="max-average-exit-pgd", eval_adversarial=False, log_every=0,
                         progress=False)
    assert isinstance(make_attack(model, config), MaxAverageExitPGD)
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, data, config, tmp_path)
    assert result["global_step"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["max-average-exit-pgd", "routing-pgd"])
def test_training_attacks_a_per_sample_lambda_batch_in_one_call(images, name):
    """The multi-exit attacks query only their whole batch, so training attacks film + exits at
    a per-sample λ in one call; the examples equal those of each λ group attacked alone."""
    x, y = images
    torch.manual_seed(0)
    model = oat_plugins.wrap("resnet10t", "film", exits="auto", model_kwargs=TINY).eval()
    with torch.no_grad():  # a FiLM that is not the identity, so each λ is its own model
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    attack = build_attack(name, model, steps=2, random_start=False)
    assert queries_whole_batch(attack) and not model.method.lambda_groups
    lam = torch.tensor([0.0, 1.0, 0.4, 1.0] * 4)
    exit_calls = []
    original = model.exit_logits
    model.exit_logits = lambda inputs: exit_calls.append(inputs.shape[0]) or original(inputs)
    together = adversarial_examples(model, attack, x, y, lam)
    assert set(exit_calls) == {16}  # one batch of 16, never a λ group
    del model.exit_logits
    for value in (0.0, 0.4, 1.0):
        group = lam == value
        with model.at(value):
            alone = attack(x[group], y[group])
        torch.testing.assert_close(together[group], alone, rtol=0, atol=1e-6)
