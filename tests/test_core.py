"""The conditional core: wrap, λ, routing, export, save/load, attacks, on many timm families."""

import copy
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchattacks
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import oat_plugins
from oat_plugins.layers import DualNorm, FiLM
from oat_plugins.surgery import foreign_modules

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
from _helpers import perturb  # noqa: E402

FAMILIES = {
    "resnet18": {},
    "resnet50": {},
    "efficientnet_b0": {},
    "tf_efficientnet_b0": {},  # Conv2dSame + BatchNormAct2d
    "mobilenetv3_small_100": {},
    "regnetx_002": {},
    "densenet121": {},
    "convnext_atto": {},  # LayerNorm2d + channels-last LayerNorm
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    # families not named in the issue
    "resnet10t": {},
    "ghostnet_050": {},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_wrap_train_export_roundtrip(name, images, tmp_path):
    backbone = timm.create_model(name, num_classes=10, **FAMILIES[name])
    reference_params = n_params(backbone)
    model = oat_plugins.wrap(backbone, "film")
    assert any(isinstance(m, DualNorm) for m in model.modules())
    assert any(isinstance(m, FiLM) for m in model.modules())

    # forward + backward with a mixed per-sample λ reaches the FiLM generators
    model.train()
    model.set_lambda(torch.tensor([0.0, 0.2, 1.0, 0.0]))
    model(images).logsumexp(1).sum().backward()
    film = next(m for m in model.modules() if isinstance(m, FiLM))
    assert film.net[2].weight.grad is not None and film.net[2].weight.grad.abs().sum() > 0

    perturb(model).eval()
    for lam in (0.0, 0.3, 1.0):
        model.set_lambda(lam)
        with torch.no_grad():
            expected = model(images)
            exported = model.export(lam).eval()
            assert (exported(images) - expected).abs().max() <= 1e-4
        assert foreign_modules(exported) == []
        assert n_params(exported) == reference_params
        assert isinstance(exported[1], type(backbone))

    path = tmp_path / "model.pt"
    model.set_lambda(0.3)
    oat_plugins.save(model, path)
    loaded = oat_plugins.load(path).eval()
    assert loaded.lam == 0.3
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_branches_really_differ(images):
    """Guards the export test above against a vacuous pass: λ changes the output."""
    model = perturb(oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film"))
    model.eval()
    with torch.no_grad():
        outs = [model.set_lambda(lam)(images) for lam in (0.0, 0.3, 1.0)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert (outs[1] - outs[2]).abs().max() > 1e-3


def test_identity_init_starts_at_backbone_output_at_lambda_zero(images):
    backbone = timm.create_model("resnet10t", num_classes=10).eval()
    with torch.no_grad():
        expected = backbone(
            (images - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        )
    model = oat_plugins.wrap(copy.deepcopy(backbone), "film").eval()
    with torch.no_grad():
        assert torch.allclose(model(images), expected, atol=1e-5)


@pytest.mark.parametrize("encoding", ["orthogonal", "sinusoidal", "scalar"])
def test_mixed_lambda_batch_equals_per_lambda_forwards(encoding, images):
    model = perturb(
        oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film", encoding=encoding)
    ).eval()
    lams = torch.tensor([0.0, 0.25, 1.0, 0.0])
    with torch.no_grad():
        mixed = model.set_lambda(lams)(images)
        single = torch.cat(
            [model.set_lambda(float(lam))(images[i : i + 1]) for i, lam in enumerate(lams)]
        )
    assert torch.allclose(mixed, single, atol=1e-5)


def test_vit_mixed_batch_and_dual_layernorm(images):
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    model = perturb(oat_plugins.wrap(backbone, "film")).eval()
    names = [r.name for r in model.replacements]
    assert "blocks.0.norm1" in names and "blocks.0.norm2" in names
    lams = torch.tensor([1.0, 0.0, 0.5, 0.1])
    with torch.no_grad():
        mixed = model.set_lambda(lams)(images)
        single = torch.cat(
            [model.set_lambda(float(v))(images[i : i + 1]) for i, v in enumerate(lams)]
        )
    assert torch.allclose(mixed, single, atol=1e-4)


def test_batchnormact_keeps_its_activation_after_film():
    backbone = timm.create_model("tf_efficientnet_b0", num_classes=10)
    original = backbone.bn1
    assert type(original).__name__ == "BatchNormAct2d"
    model = oat_plugins.wrap(backbone, "film")
    dual = model.backbone.bn1
    assert isinstance(dual, DualNorm) and dual.post is not None
    assert type(dual.act).__name__ == type(original.act).__name__
    assert isinstance(dual.clean.act, nn.Identity)  # FiLM runs between the norm and the act
    exported = model.export(1.0)[1]
    assert type(exported.bn1).__name__ == "BatchNormAct2d"
    assert type(exported.bn1.act).__name__ == type(original.act).__name__
    # timm's conv subclass survives surgery and export
    assert type(exported.conv_stem).__name__ == "Conv2dSame"


def test_shortcut_norms_get_no_film():
    model = oat_plugins.wrap(timm.create_model("resnet18", num_classes=10), "film")
    sites = {r.name: r.change for r in model.replacements}
    assert sites["layer2.0.downsample.1"] == "DualNorm"
    assert sites["layer2.0.bn1"] == "DualNorm + FiLM"
    assert "DualNorm + FiLM" in model.summary()


def test_orthogonal_encoding_interpolates_between_trained_codes():
    enc = oat_plugins.layers.OrthogonalEncoding([0.0, 0.5, 1.0], dim=8)
    codes = enc(torch.tensor([0.0, 0.5, 1.0, 0.25]))
    gram = codes[:3] @ codes[:3].T
    assert torch.allclose(gram, torch.eye(3), atol=1e-5)
    assert torch.allclose(codes[3], 0.5 * (codes[0] + codes[1]), atol=1e-6)


@pytest.mark.parametrize(
    "bad", [float("nan"), -0.1, 1.5, "0.5", None, True, torch.tensor([[0.1]]), [0.2, 2.0]]
)
def test_invalid_lambda_is_a_value_error(bad):
    model = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film")
    with pytest.raises(ValueError, match="λ"):
        model.set_lambda(bad)
    assert model.lam == 0.0


@settings(max_examples=25, deadline=None)
@given(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_any_lambda_in_unit_interval_is_accepted_and_restored(lam):
    model = _SMALL_MODEL
    with oat_plugins.condition(model, lam):
        assert model.lam == lam
    assert model.lam == 0.0


@settings(max_examples=25, deadline=None)
@given(st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1 + 1e-9), st.just(float("nan"))))
def test_any_lambda_outside_unit_interval_is_rejected(lam):
    with pytest.raises(ValueError):
        _SMALL_MODEL.set_lambda(lam)


_SMALL_MODEL = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film")


def test_per_sample_lambda_must_match_batch(images):
    model = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film")
    model.set_lambda(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="per-sample λ has 2 entries but the batch has 4"):
        model(images)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.rand(2, 3, 32, 32) * 255, r"\[0, 1\]"),
        (torch.rand(3, 32, 32), "shape"),
        (torch.rand(2, 1, 32, 32), "shape"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "float"),
    ],
)
def test_bad_inputs_have_clear_errors(x, match):
    model = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film")
    with pytest.raises(ValueError, match=match):
        model(x)


def test_unknown_method_and_option_list_what_exists():
    with pytest.raises(ValueError, match="available methods: .*film"):
        oat_plugins.wrap(timm.create_model("resnet10t"), "nope")
    with pytest.raises(ValueError, match="encoding='orthogonal'"):
        oat_plugins.wrap(timm.create_model("resnet10t"), "film", encodnig="scalar")
    assert "film" in oat_plugins.available_methods()


def test_backbone_without_norms_is_refused():
    # no norm, and no conv with a bias for the norm-free fallback (FiLM after convs)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(10))
    with pytest.raises(oat_plugins.NothingToConditionError, match="no norm layer"):
        oat_plugins.wrap(plain, "film")


def test_wrapping_twice_is_refused():
    model = oat_plugins.wrap(timm.create_model("resnet10t"), "film")
    with pytest.raises(ValueError, match="already conditioned"):
        oat_plugins.wrap(model.backbone, "film")


def test_timm_api_passes_through(images):
    model = oat_plugins.wrap("resnet10t", "film", model_kwargs={"num_classes": 7}).eval()
    assert model.num_classes == 7
    assert model.pretrained_cfg["architecture"] == "resnet10t"
    assert model.get_classifier().out_features == 7
    with torch.no_grad():
        feats = model.forward_features(images)
        assert torch.allclose(model.forward_head(feats), model(images))
    model.reset_classifier(3)
    assert model(images).shape == (4, 3)
    # recorded for load to replay (create_model kwargs stay those of the wrapped backbone)
    assert model.backbone_spec["reset_classifier"] == [{"num_classes": 3, "args": [], "kwargs": {}}]


def test_custom_normalization_and_none(images):
    backbone = timm.create_model("resnet10t", num_classes=10)
    model = oat_plugins.wrap(copy.deepcopy(backbone), "film", normalize=None).eval()
    backbone.eval()
    with torch.no_grad():
        assert torch.allclose(model(images), backbone(images), atol=1e-5)
    assert isinstance(model.export(0.0), type(backbone))
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = oat_plugins.wrap(copy.deepcopy(backbone), "film", normalize=stats).eval()
    with torch.no_grad():
        assert torch.allclose(model(images), backbone((images - 0.5) / 0.25), atol=1e-5)


@pytest.mark.parametrize(
    "make_attack, linf_bound",
    [
        (lambda m: torchattacks.PGD(m, eps=8 / 255, alpha=2 / 255, steps=3), 8 / 255),
        (lambda m: torchattacks.FGSM(m, eps=8 / 255), 8 / 255),
        (lambda m: torchattacks.CW(m, c=1, steps=3), None),  # an L2 attack without a ball
    ],
    ids=["PGD", "FGSM", "CW"],
)
def test_torchattacks_run_on_a_wrapped_model(make_attack, linf_bound, images):
    model = perturb(oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film"))
    model.eval().set_lambda(0.5)
    labels = torch.arange(4) % 10
    adv = make_attack(model)(images, labels)
    assert adv.shape == images.shape
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - images).abs().max() > 0
    if linf_bound is not None:
        assert (adv - images).abs().max() <= linf_bound + 1e-6
    assert model.lam == 0.5 and not model.training


def test_save_load_errors(tmp_path, images):
    model = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film")
    path = tmp_path / "m.pt"
    oat_plugins.save(model, path)
    with pytest.raises(ValueError, match="holds a 'film' model, not a 'float' one"):
        oat_plugins.load(path, method="float")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        oat_plugins.load(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not an oat-plugins"):
        oat_plugins.load(other)
    with pytest.raises(FileNotFoundError):
        oat_plugins.load(tmp_path / "missing.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt", "m.pt", "other.pt"]


def test_save_load_keeps_per_sample_lambda_and_encoding_buffers(tmp_path, images):
    model = perturb(
        oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film", seed=3)
    ).eval()
    lams = torch.tensor([0.0, 0.1, 0.7, 1.0])
    model.set_lambda(lams)
    oat_plugins.save(model, tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt").eval()
    assert torch.equal(loaded.lam, lams)
    assert torch.equal(loaded.extras["encoder"].codes, model.extras["encoder"].codes)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_custom_backbone_needs_backbone_argument_on_load(tmp_path, images):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model = perturb(oat_plugins.wrap(make(), "film", normalize=None)).eval()
    oat_plugins.save(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="backbone="):
        oat_plugins.load(tmp_path / "m.pt")
    loaded = oat_plugins.load(tmp_path / "m.pt", backbone=make()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_training_after_inference_mode_at_the_same_lambda(images):
    """The condition's caches must not hand inference tensors to a later autograd forward:
    training after an inference-mode forward at the same λ gives the same loss and gradients
    as training without it."""
    model = perturb(oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film"))
    for lam in (0.4, torch.tensor([0.0, 0.4, 1.0, 0.0])):
        fresh = copy.deepcopy(model)
        model.set_lambda(lam).eval()
        with torch.inference_mode():
            model(images)
        model.train()
        fresh.set_lambda(lam).train()
        grads = []
        for net in (model, fresh):
            net.zero_grad()
            loss = net(images).logsumexp(1).sum()
            loss.backward()
            film = next(m for m in net.modules() if isinstance(m, FiLM))
            grads.append((loss.detach(), film.net[2].weight.grad.clone()))
        (loss, grad), (fresh_loss, fresh_grad) = grads
        assert grad.abs().sum() > 0
        torch.testing.assert_close(loss, fresh_loss)
        torch.testing.assert_close(grad, fresh_grad)


def test_every_lambda_is_served_by_trained_film_codes():
    """Orthogonal codes: the code of any λ in [0, 1] must lie in the span of the codes the
    sampler trains (else its FiLM generators see an untrained direction); a sampler that
    leaves a code untrained is refused."""
    from oat_plugins.samplers import DiscreteLambdaSampler

    trained = (0.0, 0.5, 1.0)
    model = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film",
                             lambdas=trained)
    sampler = DiscreteLambdaSampler(trained)
    model.method.check_sampler(sampler)  # the codes follow the training set
    encoder = model.extras["encoder"]
    basis = encoder(torch.tensor(sampler.lambdas))  # codes of the λ values training draws
    codes = encoder(torch.linspace(0, 1, 21))
    residual = codes - codes @ torch.linalg.pinv(basis) @ basis
    assert float(residual.abs().max()) < 1e-5

    default = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film")
    with pytest.raises(ValueError, match="stay untrained"):
        default.method.check_sampler(sampler)
    sinusoidal = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film",
                                  encoding="sinusoidal")
    sinusoidal.method.check_sampler(sampler)  # a continuous code has no untrained entries


class _Float32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype: what CUDA autocast does."""

    def forward(self, x):
        return super().forward(x.float())


def test_mixed_lambda_dual_norm_combines_branches_of_another_dtype():
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    backbone = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(8, 16, 32, 64),
                      stem_width=8, norm_layer=lambda c: _Float32GroupNorm(4, c))
    model = perturb(oat_plugins.wrap(backbone, "film", normalize=None))
    x = torch.rand(4, 3, 32, 32)
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
    with model.at(torch.tensor([0.0, 1.0, 0.0, 1.0])), torch.no_grad(), bf16:
        mixed = model(x).float()
    for i, lam in enumerate([0.0, 1.0, 0.0, 1.0]):
        with model.at(lam), torch.no_grad(), bf16:
            torch.testing.assert_close(mixed[i], model(x[i:i + 1]).float()[0],
                                       rtol=2e-2, atol=2e-2)


def test_lambda_codes_are_exact_under_bfloat16_autocast():
    model = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "film",
                             encoding="sinusoidal")
    encoder = model.extras["encoder"]
    film = next(m for m in model.modules() if isinstance(m, FiLM))
    h = torch.zeros(1, film.channels, 2, 2, dtype=torch.bfloat16)
    with model.at(0.3), torch.autocast("cpu", dtype=torch.bfloat16):
        code = model.condition.cached(("film-encoding", id(encoder)), h, encoder)
    assert code.dtype == torch.float32
    torch.testing.assert_close(code, encoder(torch.tensor([0.3])))
