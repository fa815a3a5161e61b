"""timm families that ``tools/family_coverage.py`` found failing stay fixed: a norm-free net
(film found no norm), EfficientFormer (export could not deep-copy timm's attention-bias cache
filled by a forward with autograd on), XCiT (an int patch size broke wrap), EfficientViT-MSRA
(load passed it a patch_size it does not take); plus the pieces of those fixes on their own."""

import copy
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import ScaledStdConv2d, SpaceToDepth
from torch import nn

import oat_plugins
from oat_plugins.checkpoint import in_chans_of
from oat_plugins.layers import DualNorm
from oat_plugins.layers.conv_film import ConvFiLM, output_scale_parameter
from oat_plugins.surgery import deepcopy_module, foreign_modules

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.family_coverage import perturb  # noqa: E402 - the coverage tool's own perturbation

PREVIOUSLY_FAILING = {
    "nf_resnet26": ({}, 32),
    "efficientformer_l1": ({}, 224),  # its attention biases are sized for 224
    "xcit_nano_12_p16_224": ({"img_size": 32}, 32),
    "efficientvit_m0": ({"img_size": 32}, 32),  # has patch_embed.patch_size, takes no such kwarg
}
CASES = [(name, method) for name in PREVIOUSLY_FAILING  # conditioning methods; multiexit
         for method in oat_plugins.available_methods() if method != "multiexit"]  # (none):
# its families are in tests/test_multiexit.py


@pytest.mark.parametrize("name, method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_family_wraps_trains_exports_and_round_trips(name, method, tmp_path):
    kwargs, size = PREVIOUSLY_FAILING[name]
    backbone = timm.create_model(name, num_classes=10, **kwargs)
    model = oat_plugins.wrap(backbone, method, model_kwargs=kwargs or None)
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))

    # two samples per λ: norms in train mode see more than one sample per branch / λ group
    model.train().set_lambda(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    # FiLM, FLOAT's α, robust norm branch; SMART's masked shared weights (a norm-free net
    # gives SMART no norm branch and it adds no parameter of its own)
    added = ("post.", "film.", "alpha", "robust.", "parametrizations.weight.original")
    conditioned = [p for n, p in model.named_parameters()
                   if any(k in n for k in added) and p.grad is not None]
    assert conditioned and any(p.grad.abs().sum() > 0 for p in conditioned)

    perturb(model)
    model.eval()
    outputs = {}
    for lam in (0.0, 1.0):
        model.set_lambda(lam)
        outputs[lam] = model(x).detach()  # autograd on, as an attack queries the model
        with torch.no_grad():
            exported = model.export(lam).eval()
            assert (exported(x) - outputs[lam]).abs().max() <= 1e-4
        assert foreign_modules(exported) == []
    assert not torch.allclose(outputs[0.0], outputs[1.0])

    model.set_lambda(torch.tensor([0.0, 1.0, 0.5, 0.2]))
    oat_plugins.save(model, tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_norm_free_film_sites_skip_shortcuts_and_channel_gates():
    model = oat_plugins.wrap(timm.create_model("nf_regnet_b0", num_classes=10), "film")
    sites = {r.name for r in model.replacements}
    assert "stages.0.0.conv1" in sites and "final_conv" in sites
    assert not any(".downsample." in s or ".attn." in s for s in sites)
    folded = model.export(0.0)[1]
    assert isinstance(folded.stages[0][0].conv1, ScaledStdConv2d)
    n_plain = sum(p.numel() for p in timm.create_model("nf_regnet_b0", num_classes=10)
                  .parameters())
    assert sum(p.numel() for p in folded.parameters()) == n_plain


def test_output_scale_parameter_is_found_by_probing():
    assert output_scale_parameter(nn.Conv2d(3, 4, 3)) == "weight"
    # weight standardisation cancels a scaled weight; the gain scales the output
    std = ScaledStdConv2d(3, 4, 3)
    nn.init.zeros_(std.weight)  # NF-ResNet zero-initialises some convs: must not mislead
    assert output_scale_parameter(std) == "gain"
    assert output_scale_parameter(nn.Conv2d(3, 4, 3, bias=False)) is None  # β cannot fold


def test_conv_film_folds_into_the_conv_exactly():
    model = oat_plugins.wrap(nn.Sequential(ScaledStdConv2d(3, 8, 3), nn.ReLU(),
                                           nn.Conv2d(8, 4, 1)), "film", normalize=None)
    assert [type(m) for m in model.backbone if isinstance(m, ConvFiLM)] == [ConvFiLM] * 2
    perturb(model)
    x = torch.rand(2, 3, 8, 8)
    for lam in (0.0, 0.3, 1.0):
        model.set_lambda(lam)
        with torch.no_grad():
            assert (model.export(lam)(x) - model(x)).abs().max() <= 1e-5


class _Cache(nn.Module):
    """Caches a tensor computed from its parameter as a plain attribute, like timm's
    attention-bias caches."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(3))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache.setdefault("b", self.bias * 2)
        return x + self.cache["b"]


def test_deepcopy_module_copies_a_non_leaf_cached_tensor():
    module = _Cache()
    module(torch.zeros(3))  # autograd on: the cache holds a non-leaf tensor
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(module)
    copied = deepcopy_module(module)
    assert copied.cache["b"].grad_fn is None
    assert torch.equal(copied.cache["b"], module.cache["b"])
    assert copied.bias is not module.bias


def test_film_skips_norms_without_bias_and_exports_metaformer():
    """A FiLM after a norm with no bias (metaformer's LayerNorm2dNoBias) could not be folded
    on export: such norms get the dual norm only."""
    torch.manual_seed(0)
    model = oat_plugins.wrap("poolformerv2_s12", "film", model_kwargs={"num_classes": 10})
    films = [m for m in model.modules() if isinstance(m, DualNorm) and m.post is not None]
    no_bias = [m for m in model.modules() if isinstance(m, DualNorm) and m.clean.bias is None]
    assert films and no_bias and all(m.post is None for m in no_bias)
    perturb(model)
    model.eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with model.at(0.5), torch.enable_grad():
        expected = model(x).detach()
    torch.testing.assert_close(model.export(0.5)(x), expected, rtol=1e-4, atol=1e-4)


def test_nest_round_trips_its_int_patch_size(tmp_path):
    """NesT computes ``img_size % patch_size``: the spec gave it its patch embedding's tuple
    (4, 4) back and load failed with a TypeError."""
    kwargs = {"img_size": 32, "num_classes": 10}  # nest_tiny fixes its widths and depths
    model = oat_plugins.wrap(timm.create_model("nest_tiny", **kwargs), "film",
                             model_kwargs=kwargs)
    assert model.backbone_spec["kwargs"]["patch_size"] == 4
    perturb(model)
    model.eval()
    oat_plugins.save(model, tmp_path / "nest.pt")
    loaded = oat_plugins.load(tmp_path / "nest.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("method", [m for m in oat_plugins.available_methods()
                                    if m != "multiexit"])  # a plain module has no stages
def test_space_to_depth_stem_takes_three_channel_images(method):
    """TResNet moves 4×4 pixel blocks into channels before its first conv: the model took its
    48 input channels for the image's and refused every (N, 3, H, W) batch."""
    stem = nn.Sequential(SpaceToDepth(), nn.Conv2d(48, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    assert in_chans_of(stem) == 3
    model = oat_plugins.wrap(stem, method, normalize=None)
    model.train().set_lambda(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    logits = model(torch.rand(4, 3, 16, 16))
    assert logits.shape == (4, 10)
    F.cross_entropy(logits, torch.arange(4)).backward()
    assert all(p.grad is not None for p in model.backbone[-1].parameters())
