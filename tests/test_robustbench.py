"""RobustBench integration: entry schema, local data, benchmark protocol, compat, registration.

Real objects only: the CIFAR-10 sample bundled in the package (also written out as a PNG
image folder and archive), torch/timm models, oat_plugins conditional models (perturbed, so that
λ changes their output), pyautoattack's AutoAttack (tiny budgets where the test says so), and
the installed robustbench 1.1.1. Nothing outside the repository is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import oat_plugins
from oat_plugins.robustbench import (
    NondeterministicModelError,
    benchmark,
    compat,
    load_data,
    make_entry,
    read_entry,
    register,
    robustbench_local_data,
    snapshot_entries,
    timm_name,
    unregister,
    validate_entry,
    write_entry,
)
from oat_plugins.robustbench.entries import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    entry_id,
    format_eps,
    parse_eps,
)

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
from _helpers import bundled_images, per_class, perturb, write_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 20
TINY = {"n_iter": 10, "n_target_classes": 2, "n_queries": 20}


@pytest.fixture(scope="module")
def rb():
    """robustbench, imported through the compat layer."""
    return compat.install()


@pytest.fixture(scope="module")
def cifar():
    """The first N images of the bundled CIFAR-10 test sample."""
    return load_data("cifar10", N, bundled_images(N), data_label="CIFAR-10 sample")


def _memoriser(x: torch.Tensor, y: torch.Tensor) -> tuple[nn.Linear, torch.Tensor]:
    """A linear classifier interpolating (x, y), and each image's exact L∞ distance to its
    decision boundary (in 1/255 units; the [0, 1] box can only make it larger)."""
    feats = torch.cat([x.flatten(1).double(), torch.ones(len(x), 1, dtype=torch.double)], 1)
    target = nn.functional.one_hot(y, 10).double() * 2 - 1
    sol = torch.linalg.lstsq(feats, target).solution
    w, b = sol[:-1].T, sol[-1]
    logits = x.flatten(1).double() @ w.T + b
    dist = []
    for i in range(len(x)):
        c = int(y[i])
        dist.append(min((logits[i, c] - logits[i, j]) / (w[c] - w[j]).abs().sum()
                        for j in range(10) if j != c))
    lin = nn.Linear(x[0].numel(), 10)
    with torch.no_grad():
        lin.weight.copy_(w.float())
        lin.bias.copy_(b.float())
    return lin, torch.stack(dist).float() * 255


@pytest.fixture(scope="module")
def linear(cifar):
    x, y, _ = cifar
    lin, dist = _memoriser(x, y)
    return nn.Sequential(nn.Flatten(), lin).eval(), dist


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def _conditional_memoriser(cifar) -> oat_plugins.ConditionalModel:
    """The memoriser behind a conditioned BatchNorm moved off the identity (perturb, scale
    0.2), so that λ changes its predictions: all 20 images right at λ = 0.5, 14 at λ = 0.2."""
    x, y, _ = cifar
    lin, _ = _memoriser(x, y)
    backbone = nn.Sequential(nn.BatchNorm2d(3, eps=0.0), nn.Flatten(), lin).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)  # FiLM's initial weights, so the numbers above hold
        model = oat_plugins.wrap(backbone, "film", normalize=None)
    return perturb(model, 0.2).eval()


def _logits(model: oat_plugins.ConditionalModel, x: torch.Tensor, lam: float) -> torch.Tensor:
    with torch.no_grad(), oat_plugins.condition(model, lam):
        return model(x)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# -- entry schema --------------------------------------------------------------------------

def _entry(**over):
    kwargs = dict(model_name="OatTiny", dataset="cifar10", threat_model="Linf", eps=8 / 255,
                  clean_acc=0.8523, robust_acc=0.4,
                  architecture="resnet18", method="film", lam=0.3,
                  data_label="CIFAR-10 (JPEG q75)", n_examples=100)
    kwargs.update(over)
    return make_entry(**kwargs)


def test_entry_json_round_trip(tmp_path):
    entry = _entry()
    path = write_entry(entry, tmp_path / "cifar10" / "Linf" / f"{entry_id('OatTiny', 0.3)}.json")
    assert path.name == "OatTiny_lam0p3.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw == entry == read_entry(path)
    assert set(REQUIRED_FIELDS) <= set(raw) <= set(REQUIRED_FIELDS + OPTIONAL_FIELDS)
    assert raw["eps"] == "8/255"
    assert raw["clean_acc"] == "85.23" and raw["autoattack_acc"] == "40.00"
    assert raw["dataset"] == "cifar10" and raw["number_forward_passes"] == 1
    assert "film" in raw["name"] and "λ=0.3" in raw["name"]
    assert "measured on CIFAR-10 (JPEG q75), first 100 test images" in raw["footnote"]
    # every key we write is one RobustBench's own entries use
    snapshot_keys = set().union(*(e.keys() for e in snapshot_entries("cifar10", "Linf").values()))
    assert set(raw) <= snapshot_keys
    l2 = _entry(threat_model="L2", eps=0.5)
    assert l2["eps"] == "0.5"


@pytest.mark.parametrize("change", [
    lambda e: e.pop("autoattack_acc"),
    lambda e: e.update(threat_model="Linf"),
    lambda e: e.update(clean_acc=85.2),
    lambda e: e.update(clean_acc="185.20"),
    lambda e: e.update(additional_data="no"),
    lambda e: e.update(number_forward_passes=0),
])
def test_validate_entry_rejects_bad_entries(change):
    entry = _entry()
    change(entry)
    with pytest.raises(ValueError):
        validate_entry(entry)


def test_eps_strings():
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(4 / 255) == "4/255"
    assert format_eps(0.5) == "0.5"
    assert format_eps(0.25) == "0.25"
    for text in ("8/255", "0.5", "0.031", "1/255"):
        assert parse_eps(format_eps(parse_eps(text))) == pytest.approx(parse_eps(text))
    with pytest.raises(ValueError):
        format_eps(0.0)


def test_bad_names_and_accuracies():
    with pytest.raises(ValueError):
        entry_id("bad.name", 0.3)
    with pytest.raises(ValueError):
        _entry(robust_acc=1.5)
    with pytest.raises(ValueError, match="unknown dataset"):
        _entry(dataset="mnist")
    with pytest.raises(ValueError, match="unknown threat model"):
        _entry(threat_model="L1")


@pytest.mark.parametrize(("dataset", "threat", "count"), [("cifar10", "Linf", 99),
                                                          ("cifar10", "L2", 21),
                                                          ("cifar100", "Linf", 38)])
def test_bundled_snapshot_has_the_documented_entries(dataset, threat, count):
    # equality with RobustBench's model_info is checked by tools/check_leaderboard_snapshot.py
    bundled = snapshot_entries(dataset, threat)
    assert len(bundled) == count
    for entry in bundled.values():
        assert 0 <= float(entry["autoattack_acc"]) <= float(entry["clean_acc"]) <= 100


# -- local data ----------------------------------------------------------------------------

def test_load_data_from_an_image_folder_and_its_archive(tmp_path):
    images, labels = per_class(2)  # 2 images of each class, class by class
    root = write_image_folder(tmp_path / "cifar" / "test", images, labels)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root.parent, arcname="cifar")
    expected = torch.stack([images[2 * c + i] for i in range(2) for c in range(10)])
    for source in (root.parent, archive):
        x, y, label = load_data("cifar10", N, source)
        assert label == "CIFAR-10 images from " + Path(source).name
        assert x.shape == (N, 3, 32, 32) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1
        assert y.tolist() == list(range(10)) * 2  # round robin over the sorted classes
        assert torch.equal((x * 255).round().to(torch.uint8), expected)  # PNG is lossless
    assert load_data("cifar10", N, archive, data_label="mine")[2] == "mine"
    with pytest.raises(ValueError, match="only"):
        load_data("cifar10", N + 1, (x, y))


# -- benchmark ------------------------------------------------------------------------------

def test_benchmark_measures_clean_and_robust_accuracy(cifar, linear, tmp_path):
    x, y, _ = cifar
    model, dist = linear
    eps = 20 / 255
    certified = (dist > 20).float().mean().item()  # these cannot be broken at eps
    assert 0 < certified < 1
    result = benchmark(model, data=(x, y), n_examples=N, batch_size=8, eps=eps,
                       attack_budget=TINY, to_disk=True, model_name="linear",
                       results_dir=tmp_path, data_label="CIFAR-10 (JPEG q75)", progress=False)
    clean, robust = result
    assert clean == _accuracy(model, x, y) == 1.0
    assert certified <= robust < clean
    entry = read_entry(tmp_path / "cifar10" / "Linf" / "linear.json")
    assert entry["clean_acc"] == "100.00"
    assert entry["autoattack_acc"] == f"{100 * robust:.2f}"
    assert entry["eps"] == "20/255"
    assert "measured on CIFAR-10 (JPEG q75), first 20 test images" in entry["footnote"]
    assert "reduced AutoAttack" in entry["footnote"]  # the tiny budget is declared
    # a smaller ball than every boundary distance: nothing can be broken
    assert benchmark(model, data=(x, y), n_examples=N, batch_size=N, eps=float(dist.min()) / 300,
                     attack_budget=TINY, progress=False) == (1.0, 1.0)


def test_benchmark_standard_autoattack_breaks_an_undefended_model(cifar, linear):
    x, y, _ = cifar
    model, dist = linear
    eps = (float(dist.max()) + 8) / 255  # beyond every boundary: all breakable
    assert benchmark(model, data=(x, y), n_examples=N, batch_size=N, eps=eps,
                     progress=False) == (1.0, 0.0)


def test_benchmark_conditional_model_at_lambda(cifar, tmp_path):
    x, y, _ = cifar
    model = _conditional_memoriser(cifar)
    # λ changes the predictions, so a benchmark that ignored λ would measure a wrong number
    accuracy = {lam: _accuracy_at(model, x, y, lam) for lam in (0.2, 0.5)}
    assert accuracy[0.5] == 1.0 > accuracy[0.2]
    model.set_lambda(0.2)
    model.train()
    kwargs = dict(data=(x, y), n_examples=N, batch_size=N, eps=20 / 255, attack_budget=TINY,
                  progress=False)
    result = benchmark(model, 0.5, to_disk=True, model_name="oat-mem", results_dir=tmp_path,
                       **kwargs)
    assert model.lam == 0.2 and model.training  # state restored
    assert result.clean_acc == accuracy[0.5]
    assert result.robust_acc <= result.clean_acc
    # the plain model the conditional one computes at λ = 0.5 gets the same AutoAttack
    # outcome (seed fixed); at λ = 0.2 the numbers differ
    plain = model.export(0.5).eval()
    with torch.no_grad():
        assert torch.equal(plain(x).argmax(1), _logits(model.eval(), x, 0.5).argmax(1))
    assert result == benchmark(plain, **kwargs)
    assert result != benchmark(model, 0.2, **kwargs)
    entry = read_entry(tmp_path / "cifar10" / "Linf" / "oat-mem_lam0p5.json")
    assert entry["name"] == "oat-mem (film, λ=0.5)"
    assert entry["clean_acc"] == "100.00"
    assert entry["architecture"] == "Sequential"


def _accuracy_at(model: oat_plugins.ConditionalModel, x: torch.Tensor, y: torch.Tensor,
                 lam: float) -> float:
    return (_logits(model, x, lam).argmax(1) == y).float().mean().item()


def test_benchmark_checkpoint_path_equals_model(cifar, tmp_path):
    x, y, _ = cifar
    model = perturb(oat_plugins.wrap(timm.create_model("test_byobnet", num_classes=10), "film"))
    path = tmp_path / "byob.pt"
    oat_plugins.save(model.eval(), path)
    kwargs = dict(data=(x, y), n_examples=4, batch_size=4, attack_budget=TINY, progress=False)
    assert benchmark(path, 1.0, **kwargs) == benchmark(model, 1.0, **kwargs)


class _Noisy(nn.Module):
    """A classifier whose forward draws fresh noise (what RobustBench must refuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    def forward(self, x):
        return self.body(x + 0.05 * torch.randn_like(x))


def test_benchmark_input_errors(cifar, linear):
    x, y, _ = cifar
    model, _ = linear
    cond = _conditional_memoriser(cifar)
    kwargs = dict(data=(x, y), n_examples=4, batch_size=4, attack_budget=TINY, progress=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        benchmark(model, dataset="imagenet", **kwargs)
    with pytest.raises(ValueError, match="unknown threat model"):
        benchmark(model, threat_model="corruptions", **kwargs)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        benchmark(cond, 1.5, **kwargs)
    with pytest.raises(ValueError, match="needs lam"):
        benchmark(cond, None, **kwargs)
    with pytest.raises(ValueError, match="not a conditional model"):
        benchmark(model, 0.5, **kwargs)
    with pytest.raises(ValueError, match="model_name"):
        benchmark(model, to_disk=True, **kwargs)
    with pytest.raises(ValueError, match="budget"):
        benchmark(model, **{**kwargs, "attack_budget": {"n_restarts": 1}})
    with pytest.raises(ValueError, match="classes"):
        benchmark(model, dataset="cifar100", **kwargs)
    with pytest.raises(NondeterministicModelError, match="deterministic"):
        benchmark(_Noisy().eval(), **kwargs)
    resampled = oat_plugins.wrap(timm.create_model("test_byobnet", num_classes=10), "float",
                                 noise="resample")
    assert resampled.deterministic is False
    with pytest.raises(NondeterministicModelError, match="resampled noise"):
        benchmark(resampled, 1.0, **kwargs)
    with pytest.raises(FileNotFoundError):
        benchmark(model, n_examples=4, data=REPO / "no-such-data", progress=False)


# -- compat and robustbench itself ---------------------------------------------------------

def test_import_is_lazy_and_compat_install_makes_robustbench_importable():
    # a fresh interpreter, so sys.modules tells what importing oat_plugins pulled in
    code = """
import inspect, sys
import oat_plugins, oat_plugins.robustbench, oat_plugins.cli.leaderboard, oat_plugins.cli.benchmark
bad = [m for m in sys.modules if m.split('.')[0] in ('robustbench', 'autoattack', 'pyautoattack')]
assert not bad, bad
from oat_plugins.robustbench import compat
rb = compat.install()
assert compat.install() is rb and compat.is_installed()
import robustbench, robustbench.eval, robustbench.utils
assert robustbench is rb
assert 'autoattack' not in sys.modules  # the alias was only there during the import
aa = robustbench.eval.AutoAttack
assert 'log_path' in inspect.signature(aa.__init__).parameters
assert 'bs' in inspect.signature(aa.run_standard_evaluation).parameters
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_compat_autoattack_has_the_original_api(cifar, linear, tmp_path):
    x, y, _ = cifar
    model, dist = linear
    AutoAttack = compat.autoattack_class()
    eps = (float(dist.max()) + 8) / 255
    log = tmp_path / "aa.log"
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0,
                           log_path=str(log))
    x_adv = adversary.run_standard_evaluation(x, y, bs=N)
    assert isinstance(x_adv, torch.Tensor) and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert _accuracy(model, x_adv, y) == 0.0
    assert "apgd-ce" in log.read_text()
    x_adv2, y_adv = adversary.run_standard_evaluation(x, y, bs=N, return_labels=True)
    assert torch.equal(x_adv2, x_adv) and y_adv.shape == y.shape


def test_robustbench_eval_benchmark_end_to_end(rb, cifar, linear, tmp_path, monkeypatch):
    import robustbench.eval
    from robustbench.utils import load_model

    x, y, _ = cifar
    model, dist = linear
    monkeypatch.chdir(tmp_path)  # robustbench writes ./model_info/...
    register("OatLinear-E2E", model, None, "cifar10", "Linf")
    try:
        loaded = load_model("OatLinear-E2E", model_dir=tmp_path / "models",
                            dataset="cifar10", threat_model="Linf")
        eps = (float(dist.max()) + 8) / 255
        with robustbench_local_data("cifar10", (x, y)):
            clean, robust = robustbench.eval.benchmark(
                loaded, n_examples=N, dataset="cifar10", threat_model="Linf", eps=eps,
                batch_size=N, to_disk=True, model_name="OatLinear-E2E",
                data_dir=str(tmp_path / "nothing-here"))
    finally:
        unregister("OatLinear-E2E", "cifar10", "Linf")
    assert not (tmp_path / "models").exists()  # nothing was downloaded
    assert (clean, robust) == (1.0, 0.0)
    written = json.loads((tmp_path / "model_info" / "cifar10" / "Linf" /
                          "OatLinear-E2E.json").read_text())
    assert written["clean_acc"] == "100.0" and written["autoattack_acc"] == "0.0"


# -- registration ---------------------------------------------------------------------------

def test_register_conditional_model_by_name(rb, cifar):
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    x, _, _ = cifar
    model = perturb(oat_plugins.wrap(_tiny_cnn(), "film", normalize=None)).eval()
    expected = _logits(model, x, 0.7)
    for lam in (0.0, 0.5, 1.0):  # so a model registered at another λ would not match
        assert not torch.allclose(_logits(model, x, lam), expected, atol=1e-3)
    tname = register("Oat-Tiny", model, 0.7, "cifar10", "Linf")
    try:
        assert tname == timm_name("Oat-Tiny", "cifar10", "Linf") == "oat_tiny_cifar10_linf"
        loaded = load_model("Oat-Tiny", dataset="cifar10", threat_model="Linf")
        again = timm.create_model(tname)
        assert "Oat-Tiny" in model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]
        for net in (loaded, again):
            assert not net.training
            assert not any(type(m).__module__.startswith("oat_plugins") for m in net.modules())
            with torch.no_grad():
                torch.testing.assert_close(net(x), expected)
        # each build is a fresh copy: changing one leaves the registered model intact
        with torch.no_grad():
            next(loaded.parameters()).add_(1.0)
            torch.testing.assert_close(timm.create_model(tname)(x), expected)
    finally:
        unregister("Oat-Tiny", "cifar10", "Linf")
    assert not timm.is_model(tname)
    assert "Oat-Tiny" not in model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]


def test_register_checkpoint_file(rb, cifar, tmp_path):
    from robustbench.utils import load_model

    x, _, _ = cifar
    model = perturb(oat_plugins.wrap(timm.create_model("test_byobnet", num_classes=100), "film"))
    path = tmp_path / "byob100.pt"
    oat_plugins.save(model.eval(), path)
    expected = _logits(model, x[:4], 0.3)
    assert not torch.allclose(_logits(model, x[:4], 0.0), expected, atol=1e-3)
    assert not torch.allclose(_logits(model, x[:4], 1.0), expected, atol=1e-3)
    register("OatByob", path, 0.3, dataset="cifar100", threat_model="L2")
    try:
        loaded = load_model("OatByob", dataset="cifar100", threat_model="L2")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x[:4]), expected)
        with pytest.raises(ValueError, match="classes"):
            timm.create_model("oatbyob_cifar100_l2", num_classes=10)
    finally:
        unregister("OatByob", "cifar100", "L2")


def test_register_errors(tmp_path):
    model = oat_plugins.wrap(_tiny_cnn(), "film", normalize=None)
    with pytest.raises(ValueError, match="already has"):
        register("Standard", model, 0.5, "cifar10", "Linf")
    with pytest.raises(ValueError):
        register("bad.name", model, 0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        register("OatX", model, -0.1)
    with pytest.raises(ValueError, match="needs lam"):
        register("OatX", model, None)
    with pytest.raises(ValueError, match="unknown dataset"):
        register("OatX", model, 0.5, dataset="imagenet")
    with pytest.raises(ValueError, match="unknown threat model"):
        register("OatX", model, 0.5, threat_model="corruptions")
    with pytest.raises(FileNotFoundError):
        register("OatX", tmp_path / "missing.pt", 0.5)
    with pytest.raises(KeyError):
        unregister("OatX")
