"""Every torchattacks attack runs on a wrapped model, and the input check lets attacks through
while still catching normalised or 0-255 images."""

import inspect
import warnings

import pytest
import timm
import torch
import torchattacks
from torchattacks.attack import Attack

import oat_plugins

WRAPPERS = {"MultiAttack", "LGV"}
"""Attacks built from other attacks or a training loader, not from a model alone."""

SMALL = {
    "steps": 2, "max_iterations": 10, "binary_search_steps": 1, "num_iter_set": 2,
    "n_queries": 10, "restarts": 1, "popsize": 4, "nb_sample": 8, "max_batch_size": 8,
    "eot_iter": 1, "noise_batch_size": 2, "m": 2, "N": 2, "len_kernel": 3, "n_classes": 10,
}
"""Small budgets, passed to every attack whose constructor has the argument (EAD needs
max_iterations >= 10: it checks every max_iterations // 10 steps)."""

ATTACKS = sorted(
    name for name, cls in vars(torchattacks).items()
    if inspect.isclass(cls) and issubclass(cls, Attack) and cls is not Attack
    and name not in WRAPPERS
)


def build(name: str, model: torch.nn.Module) -> Attack:
    cls = getattr(torchattacks, name)
    accepted = inspect.signature(cls.__init__).parameters
    attack = cls(model, **{k: v for k, v in SMALL.items() if k in accepted})
    if name == "AutoAttack":  # no budget arguments: shrink its inner attacks
        for inner in attack._autoattack.attacks:
            for key in ("steps", "n_queries", "n_restarts", "n_target_classes"):
                if hasattr(inner, key):
                    setattr(inner, key, 1 if key != "steps" else 2)
    return attack


@pytest.fixture(scope="module")
def models():
    out = {}
    for method in ("film", "float"):
        torch.manual_seed(0)
        model = oat_plugins.wrap(timm.create_model("test_efficientnet", num_classes=10), method)
        out[method] = model.eval().set_lambda(0.5)
    return out


def test_all_37_attack_classes_are_enumerated():
    assert len(ATTACKS) == 37, ATTACKS
    for name in ("NIFGSM", "SINIFGSM", "VMIFGSM", "VNIFGSM", "PGDRS", "PGDRSL2", "SPSA"):
        assert name in ATTACKS


@pytest.mark.filterwarnings("ignore:a conditional model got input values outside")
@pytest.mark.parametrize("method", ["film", "float"])
@pytest.mark.parametrize("name", ATTACKS)
def test_attack_runs_on_a_wrapped_model(name, method, models):
    model = models[method]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=g)
    labels = torch.tensor([1, 7])
    adv = build(name, model)(images, labels)
    assert adv.shape == images.shape and adv.dtype == images.dtype
    assert torch.isfinite(adv).all()
    assert model.lam == 0.5 and not model.training


def _model():
    return oat_plugins.wrap(timm.create_model("test_efficientnet", num_classes=10), "film").eval()


def test_values_slightly_outside_the_image_box_warn_and_run():
    x = torch.rand(2, 3, 16, 16) * 1.2 - 0.1
    with pytest.warns(UserWarning, match="outside \\[0, 1\\]; they are accepted"):
        assert _model()(x).shape == (2, 10)


def test_images_with_randomised_smoothing_noise_are_accepted():
    """PGDRS adds N(0, 0.5²) noise: values well below -1 and above 2, mean that of images."""
    x = torch.rand(4, 3, 16, 16) + 0.5 * torch.randn(4, 3, 16, 16)
    assert x.min() < -1 and x.max() > 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _model()(x).shape == (4, 10)


@pytest.mark.parametrize(
    "make, cause",
    [
        (lambda x: (x - 0.45) / 0.225, "already-normalised images"),  # ImageNet statistics
        (lambda x: x * 255, "0-255 images"),
    ],
    ids=["normalised", "0-255"],
)
def test_normalised_or_0_255_images_are_a_clear_error(make, cause):
    x = make(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=f"{cause}.*pass unnormalised images"):
        _model()(x)


def test_check_inputs_false_accepts_anything():
    model = oat_plugins.wrap(timm.create_model("test_efficientnet", num_classes=10), "film",
                             check_inputs=False).eval()
    assert model((torch.rand(2, 3, 16, 16) - 0.45) / 0.225).shape == (2, 10)
