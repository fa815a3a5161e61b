"""The attack registry: one vocabulary for training, evaluation and GDWS."""

import importlib

import pytest
import timm
import torch
import torchattacks

import oat_plugins
from oat_plugins import attacks
from oat_plugins.attacks import (
    ATTACKS,
    MULTIEXIT_ATTACKS,
    available_attacks,
    build_attack,
    register_attack,
    resolve_attack,
    unregister_attack,
)
from oat_plugins.cli import build_parser
from oat_plugins.evaluate import evaluate
from oat_plugins.gdws import default_attack
from oat_plugins.train import TrainConfig, default_alpha, make_attack

# The module (oat_plugins.evaluate, the attribute, is the function).
evaluate_module = importlib.import_module("oat_plugins.evaluate")

TINY = {"num_classes": 10, "channels": (8, 16, 16, 16), "stem_width": 8}
EPS = {"Linf": 8 / 255, "L2": 0.5}


def _calibrate(model, lambdas=(None,)):
    """Average the norm statistics over a few batches (at each λ: distinct branches), so that
    the logits depend on the image enough for every attack to succeed (APGD, AutoAttack and
    Square return the image they failed on, and AutoAttack falls back to 5000 queries)."""
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
                norm.momentum = None  # a cumulative average over the batches below
                norm.reset_running_stats()
        model.train()
        for lam in lambdas:
            if lam is not None:
                model.set_lambda(lam)
            model(torch.rand(32, 3, 32, 32))
    return model.eval()


def _film_model():
    """A wrapped model moved off its identity initialisation, at λ = 0.5."""
    torch.manual_seed(0)
    model = oat_plugins.wrap("resnet10t", "film", model_kwargs=TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return _calibrate(model, (0.0, 1.0)).set_lambda(0.5)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    plain = _calibrate(timm.create_model("resnet10t", **TINY))
    return {"film": _film_model(), "timm": plain}


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_the_film_model_depends_on_lambda(models, images):
    model = models["film"]
    with torch.no_grad(), oat_plugins.condition(model, 0.0):
        at_zero = model(images)
    with torch.no_grad(), oat_plugins.condition(model, 1.0):
        at_one = model(images)
    assert (at_zero - at_one).abs().max() > 1e-2


def _assert_in_ball(adv, x, eps, norm):
    assert adv.shape == x.shape
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "Linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-4) + 1e-6
    assert float(size.max()) > 0  # the attack moved the images


@pytest.mark.parametrize("kind", ["film", "timm"])
# the multi-exit attacks need exits: tests/test_multiexit_attacks.py
@pytest.mark.parametrize("name", [n for n in available_attacks() if n not in MULTIEXIT_ATTACKS])
def test_every_registered_attack_runs_inside_the_ball(models, images, name, kind):
    model = models[kind]
    spec = ATTACKS[name]
    with torch.no_grad():
        labels = model(images).argmax(1)  # every example starts correctly classified
    steps = 50 if name == "square" else 2  # Square's steps are queries: it needs a few dozen
    attack = build_attack(name, model, steps=steps, seed=0)
    assert isinstance(attack, torchattacks.attack.Attack)
    adv = attack(images, labels)
    _assert_in_ball(adv, images, EPS[spec.norm], spec.norm)
    if kind == "film":
        assert model.lam == 0.5 and not model.training


def test_names_are_case_insensitive_and_aliases_resolve():
    assert resolve_attack("PGD").name == "pgd"
    assert resolve_attack("FFGSM").name == resolve_attack("fgsm-rs").name == "fgsm-rs"
    assert resolve_attack("APGDT").name == "apgd-t"
    assert resolve_attack("EOTPGD").name == "eot-pgd"
    assert resolve_attack("pgdl2").name == "pgd-l2"
    # A registered name shadows the torchattacks class; the prefix reaches the class.
    assert resolve_attack("CW").name == "cw"
    assert resolve_attack("torchattacks.CW").name == "CW"


def test_unknown_name_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError) as info:
        build_attack("pgd7", torch.nn.Linear(2, 2))
    message = str(info.value)
    assert message.startswith("unknown attack 'pgd7'")
    assert all(name in message for name in available_attacks())
    assert "torchattacks" in message
    with pytest.raises(ValueError, match="unknown attack"):
        resolve_attack("torchattacks.NoSuchAttack")
    with pytest.raises(ValueError, match="trainloader"):
        resolve_attack("LGV")  # needs more than a model: named in the error


def test_a_torchattacks_class_name_is_built_with_the_parameters_it_accepts(models, images):
    model = models["film"]
    tpgd = build_attack("TPGD", model, eps=4 / 255, alpha=1 / 255, steps=3, seed=5)
    assert type(tpgd) is torchattacks.TPGD  # TPGD takes no random_start and no seed
    assert (tpgd.eps, tpgd.alpha, tpgd.steps) == (4 / 255, 1 / 255, 3)
    with torch.no_grad():
        labels = model(images).argmax(1)
    _assert_in_ball(tpgd(images, labels), images, 4 / 255, "Linf")
    config = resolve_attack("mifgsm", eps=4 / 255, steps=3)
    assert config.name == "MIFGSM" and config.description == "MIFGSM-3 (L∞, ε=4/255, α=0.01307)"
    cw = build_attack("torchattacks.CW", model, eps=4 / 255, steps=3)  # unbounded: no eps
    assert type(cw) is torchattacks.CW and cw.steps == 3
    assert resolve_attack("torchattacks.CW", steps=3).eps is None


def test_defaults_and_descriptions():
    pgd = resolve_attack("pgd", steps=10)
    assert pgd.eps == pytest.approx(8 / 255) and pgd.alpha == pytest.approx(2 / 255)
    assert pgd.description == "PGD-10 (L∞, ε=8/255, α=2/255)"
    assert resolve_attack("pgd-l2").eps == 0.5
    assert resolve_attack("fgsm-rs").alpha == pytest.approx(1.25 * 8 / 255)
    apgd = resolve_attack("apgd", steps=5)
    assert apgd.alpha is None and apgd.description == "APGD-CE-5 (L∞, ε=8/255)"
    assert resolve_attack("autoattack").steps is None
    with pytest.raises(ValueError, match="steps"):
        resolve_attack("pgd", steps=0)
    with pytest.raises(ValueError, match="eps"):
        resolve_attack("pgd", eps=-1.0)


def test_builders_get_the_settings(models):
    model = models["timm"]
    apgdt = build_attack("apgd-t", model, eps=4 / 255, steps=3, seed=7)
    assert (apgdt.eps, apgdt.steps, apgdt.seed, apgdt.n_target_classes) == (4 / 255, 3, 7, 9)
    square = build_attack("square", model, steps=30, seed=2)
    assert square.n_queries == 30 and square.seed == 2
    eot = build_attack("eot-pgd", model, steps=2)
    assert eot.eot_iter == 10
    pgd = build_attack("pgd", model, steps=2, random_start=False)
    assert not pgd.random_start


def test_training_and_gdws_build_through_the_registry(models):
    model = models["film"]
    fast = make_attack(model, TrainConfig(attack="FFGSM", eps=8 / 255))
    assert type(fast) is torchattacks.FFGSM and fast.alpha == pytest.approx(10 / 255)
    assert default_alpha("fgsm-rs", 8 / 255, 7) == pytest.approx(10 / 255)
    assert default_alpha("pgd", 8 / 255, 7) == pytest.approx(min(10 / 255, 12 / 255) / 7)
    cw = make_attack(model, TrainConfig(attack="cw", steps=3))  # an evaluation name trains too
    assert type(cw) is attacks.CWLinf and cw.alpha == pytest.approx(default_alpha("cw", 8 / 255, 3))
    with pytest.raises(ValueError, match="unknown attack 'nope'.*fgsm-rs"):
        make_attack(model, TrainConfig(attack="nope"))
    gdws = default_attack(model)
    assert type(gdws) is torchattacks.PGD
    assert (gdws.eps, gdws.alpha, gdws.steps) == (8 / 255, pytest.approx(2 / 255), 10)


def test_a_registered_attack_is_usable_by_name_in_evaluate(models, images):
    model = models["film"]
    built = []

    def half_step(model, *, eps, steps):
        built.append((eps, steps))
        return torchattacks.PGD(model, eps=eps / 2, alpha=eps / 2, steps=1)

    register_attack("half-pgd", half_step, label="HalfPGD-{steps}", aliases=("halfpgd",))
    try:
        assert "half-pgd" in evaluate_module.available_attacks()
        labels = torch.zeros(4, dtype=torch.long)
        result = evaluate(model, (images, labels), [0.0, 1.0], attack="HalfPGD", eps=4 / 255,
                          steps=3, progress=False)
        assert built == [(4 / 255, 3)]
        assert result.meta["attack_name"] == "half-pgd"
        assert result.rows[0].attack == "HalfPGD-3 (L∞, ε=4/255)"
        with pytest.raises(ValueError, match="already registered"):
            register_attack("HALF-PGD", half_step)
        with pytest.raises(ValueError, match="already registered"):
            register_attack("other", half_step, aliases=("pgd",))
    finally:
        unregister_attack("half-pgd")
    assert "half-pgd" not in available_attacks()
    with pytest.raises(ValueError, match="unknown attack 'halfpgd'"):
        resolve_attack("halfpgd")


def test_cli_attack_options_list_the_registry(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in available_attacks())
    assert parser.parse_args(["eval", "--checkpoint", "m.pt", "--attack", "TPGD"]).attack
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--checkpoint", "m.pt", "--attack", "pgd7"])
    assert "invalid choice: 'pgd7'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in available_attacks())
