"""Tests for oat_plugins.gdws: exact allocation, layer equivalence, conversion, alphas, I/O, CLI."""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import create_conv2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2d
from torch import nn

from oat_plugins.gdws import (
    GDWSConv2d,
    compute_alphas,
    conv_spec,
    convert,
    count_macs,
    format_report,
    full_rank,
    lego,
    load_converted,
    mego,
    save_converted,
)

# ----------------------------------------------------------------------------- helpers


def _weighted_error(
    w: torch.Tensor, w_hat: torch.Tensor, alpha: torch.Tensor, groups: int
) -> float:
    """sum_c alpha_c ||W_c - What_c||_F^2, W_c the slice of global input channel c."""
    m, cg = w.shape[:2]
    mg = m // groups
    d = (w - w_hat).double()
    err = 0.0
    for c in range(cg * groups):
        j, cl = divmod(c, cg)
        err += float(alpha[c]) * float(d[j * mg:(j + 1) * mg, cl].square().sum())
    return err


def _channel_matrices(w: torch.Tensor, groups: int) -> list[np.ndarray]:
    m, cg, kh, kw = w.shape
    mg = m // groups
    out = []
    for c in range(cg * groups):
        j, cl = divmod(c, cg)
        out.append(w[j * mg:(j + 1) * mg, cl].reshape(mg, kh * kw).double().numpy())
    return out


def _trunc_err(mat: np.ndarray, rank: int) -> float:
    """Measured ||W - best rank-`rank` approx||_F^2 (numpy SVD, reconstruction)."""
    u, s, vt = np.linalg.svd(mat, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return float(np.square(mat - approx).sum())


def _brute_force_table(w: torch.Tensor, alpha: torch.Tensor, groups: int) -> dict[int, float]:
    """For every total G: the minimum weighted error over all per-channel rank allocations."""
    mats = _channel_matrices(w, groups)
    ranks = [min(m.shape) for m in mats]
    errs = [[float(alpha[c]) * _trunc_err(mats[c], r) for r in range(ranks[c] + 1)]
            for c in range(len(mats))]
    best: dict[int, float] = {}
    for alloc in itertools.product(*[range(r + 1) for r in ranks]):
        g = sum(alloc)
        e = sum(errs[c][a] for c, a in enumerate(alloc))
        if g not in best or e < best[g]:
            best[g] = e
    return best


SHAPES = [  # (M, C/groups, Kh, Kw, groups)
    (3, 2, 2, 2, 1),  # M < K^2
    (5, 2, 2, 2, 1),  # M > K^2
    (2, 3, 2, 3, 1),  # rectangular kernel, M < K^2
    (4, 1, 2, 2, 2),  # grouped: 2 groups, 1 input channel each
]


# ----------------------------------------------------------------------------- MEGO / LEGO


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("unit_alpha", [True, False])
def test_mego_matches_brute_force(shape: tuple[int, ...], unit_alpha: bool) -> None:
    m, cg, kh, kw, g = shape
    gen = torch.Generator().manual_seed(hash(shape) % 1000 + unit_alpha)
    w = torch.randn(m, cg, kh, kw, generator=gen, dtype=torch.float64)
    alpha = torch.ones(cg * g) if unit_alpha else torch.rand(cg * g, generator=gen) + 0.1
    table = _brute_force_table(w, alpha, g)
    n_full = full_rank(w, g)
    assert max(table) == n_full
    for budget in range(1, n_full + 1):
        f = mego(w, None if unit_alpha else alpha, budget, groups=g)
        assert f.num_components == budget
        assert f.error == pytest.approx(table[budget], rel=1e-9, abs=1e-12)
        measured = _weighted_error(w, f.weight(), alpha, g)
        assert measured == pytest.approx(f.error, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_lego_matches_brute_force(shape: tuple[int, ...]) -> None:
    m, cg, kh, kw, g = shape
    gen = torch.Generator().manual_seed(7 + hash(shape) % 1000)
    w = torch.randn(m, cg, kh, kw, generator=gen, dtype=torch.float64)
    alpha = torch.rand(cg * g, generator=gen) + 0.1
    table = _brute_force_table(w, alpha, g)
    total = table[0]
    for beta in [0.0, 0.01 * total, 0.1 * total, 0.3 * total, 0.7 * total, 0.99 * total]:
        f = lego(w, alpha, beta, groups=g)
        # fewest components that reach error <= beta (at least one is always kept)
        g_min = max(1, min(k for k, e in table.items() if e <= beta + 1e-12))
        assert f.num_components == g_min, (beta, table)
        assert f.error <= beta + 1e-12
        assert f.error == pytest.approx(table[g_min], rel=1e-9, abs=1e-12)
        assert _weighted_error(w, f.weight(), alpha, g) == pytest.approx(f.error, rel=1e-9,
                                                                         abs=1e-12)


def test_lego_beta_zero_keeps_full_rank_and_large_beta_keeps_one() -> None:
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    assert lego(w, None, 0.0).num_components == full_rank(w)
    assert lego(w, None, 0.0).error == 0.0
    f = lego(w, None, 1e9)
    assert f.num_components == 1


def test_alpha_weighting_changes_allocation() -> None:
    w = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    a = torch.tensor([1.0, 0.0])  # channel 1 does not matter at all
    f = mego(w, a, 4)
    assert f.channel_index.tolist() == [0, 0, 0, 0]
    assert f.error == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda w: mego(w, None, 0), "budget"),
        (lambda w: mego(w, None, full_rank(w) + 1), "budget"),
        (lambda w: mego(w, None, 2.5), "budget"),
        (lambda w: lego(w, None, -1.0), "beta"),
        (lambda w: lego(w, None, float("nan")), "beta"),
        (lambda w: lego(w, torch.ones(5), 1.0), "alpha"),
        (lambda w: lego(w, -torch.ones(3), 1.0), "alpha"),
        (lambda w: mego(w[0], None, 1), "4-D"),
        (lambda w: mego(w, None, 1, groups=4), "groups"),
    ],
)
def test_allocation_rejects_bad_input(call, msg: str) -> None:
    w = torch.randn(6, 3, 3, 3)
    with pytest.raises(ValueError, match=msg):
        call(w)


# ----------------------------------------------------------------------------- layer


def _full_rank_layer(conv: nn.Conv2d) -> GDWSConv2d:
    spec = conv_spec(conv)
    f = mego(spec.weight, None, full_rank(spec.weight, spec.groups), groups=spec.groups)
    return GDWSConv2d.from_factors(
        f, bias=spec.bias, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
        padding_mode=spec.padding_mode, same_pad=spec.same_pad,
    )


CONVS = {
    "plain": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "M<K2_stride2": lambda: nn.Conv2d(5, 4, 3, stride=2, padding=1),
    "rect_dilated": lambda: nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=2, bias=False),
    "grouped": lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2),
    "reflect": lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
    "torch_same": lambda: nn.Conv2d(3, 4, 4, padding="same"),
    "timm_same_dynamic": lambda: Conv2dSame(4, 6, 3, stride=2),
    "create_conv2d_same": lambda: create_conv2d(4, 6, 5, stride=2, padding="same"),
    "std": lambda: StdConv2d(4, 6, 3, padding=1),
    "scaled_std_same": lambda: ScaledStdConv2dSame(4, 6, 3, stride=2),
}


@pytest.mark.parametrize("kind", list(CONVS))
def test_full_rank_layer_reproduces_conv(kind: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[kind]().eval()
    if kind == "create_conv2d_same":
        assert isinstance(conv, Conv2dSame)  # timm picks the dynamic-padding class here
    layer = _full_rank_layer(conv).eval()
    for hw in [(11, 13), (16, 16)]:
        x = torch.randn(2, conv.in_channels, *hw)
        with torch.no_grad():
            ref, out = conv(x), layer(x)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= 1e-4


@settings(max_examples=30, deadline=None)
@given(
    cg=st.integers(1, 3), mg=st.integers(1, 4), groups=st.integers(1, 3),
    kh=st.integers(1, 3), kw=st.integers(1, 3), stride=st.integers(1, 2),
    dilation=st.integers(1, 2), padding=st.integers(0, 2), frac=st.floats(0.05, 1.0),
    use_alpha=st.booleans(), seed=st.integers(0, 2**16),
)
def test_layer_equals_dense_conv_of_its_factors(
    cg: int, mg: int, groups: int, kh: int, kw: int, stride: int, dilation: int, padding: int,
    frac: float, use_alpha: bool, seed: int,
) -> None:
    """Any G, any geometry: the layer computes the conv with the approximated weight."""
    gen = torch.Generator().manual_seed(seed)
    c, m = cg * groups, mg * groups
    w = torch.randn(m, cg, kh, kw, generator=gen)
    b = torch.randn(m, generator=gen)
    alpha = torch.rand(c, generator=gen) if use_alpha else None
    n_full = full_rank(w, groups)
    f = mego(w, alpha, max(1, round(frac * n_full)), groups=groups)
    layer = GDWSConv2d.from_factors(f, bias=b, stride=stride, padding=padding,
                                    dilation=dilation)
    x = torch.randn(2, c, 7, 8, generator=gen)
    ref = F.conv2d(x, f.weight(), b, stride, padding, dilation, groups)
    with torch.no_grad():
        out = layer(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4
    assert torch.allclose(layer.dense_weight(), f.weight(), atol=1e-5)


def test_layer_macs_and_layouts() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    f = mego(conv.weight, None, 8)  # 8 of 72 components
    layer = GDWSConv2d.from_factors(f, bias=conv.bias, padding=1)
    assert layer.macs_per_pixel == 8 * (9 + 16)
    assert layer.original_macs_per_pixel == 8 * 9 * 16
    # uniform allocation (2 per channel) uses the channel-multiplier layout without gather
    w = torch.zeros(16, 8, 3, 3)
    w[:, :, 0, 0] = torch.randn(16, 8)
    w[:, :, 1, 1] = torch.randn(16, 8)
    fu = mego(w, None, 16)
    assert fu.counts().tolist() == [2] * 8
    lu = GDWSConv2d.from_factors(fu, bias=None, padding=1)
    assert not lu.gather and lu.channel_index is None
    x = torch.randn(1, 8, 7, 7)
    with torch.no_grad():
        assert (lu(x) - F.conv2d(x, w, padding=1)).abs().max() <= 1e-4
    assert torch.allclose(lu.dense_weight(), w, atol=1e-5)


def test_grouped_layer_pads_groups_and_counts_padding() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    a = torch.tensor([1.0, 1.0, 1e-6, 1e-6])  # group 1 barely matters
    f = mego(conv.weight, a, 5, groups=2)
    counts = f.counts()
    assert counts[:2].sum() > counts[2:].sum()
    layer = GDWSConv2d.from_factors(f, bias=conv.bias, padding=1)
    per_group = int(max(counts[:2].sum(), counts[2:].sum()))
    assert layer.num_components == 2 * per_group
    assert layer.macs_per_pixel == 2 * per_group * (9 + 3)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = F.conv2d(x, f.weight(), conv.bias, padding=1, groups=2)
        assert (layer(x) - ref).abs().max() <= 1e-4


def _low_rank_weight(m: int, ranks: list[int], kh: int, kw: int, gen: torch.Generator,
                     groups: int = 1) -> torch.Tensor:
    """``(M, C/groups, Kh, Kw)`` weight whose input channel c has rank exactly ``ranks[c]``."""
    mg = m // groups
    cg = len(ranks) // groups
    w = torch.zeros(m, cg, kh * kw)
    for c, r in enumerate(ranks):
        j, cl = divmod(c, cg)
        u, v = torch.randn(mg, r, generator=gen), torch.randn(r, kh * kw, generator=gen)
        w[j * mg:(j + 1) * mg, cl] = u @ v
    return w.reshape(m, cg, kh, kw)


GEOMETRIES = {  # (C, M, K, conv kwargs)
    "plain": (6, 8, (3, 3), {"padding": 1}),
    "stride2_pad0": (5, 7, (3, 3), {"stride": 2}),
    "dilated_rect": (4, 6, (3, 2), {"padding": (2, 1), "dilation": 2}),
    "grouped": (6, 8, (3, 3), {"padding": 1, "groups": 2}),
    "same_string": (4, 5, (3, 3), {"padding": "same"}),
    "reflect": (4, 5, (3, 3), {"padding": 1, "padding_mode": "reflect"}),
}
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


LAYOUT_CASES = [  # replicate needs groups == 1 (test_replicate_rejects_groups_...)
    (geo, fmt, ranks, layout)
    for geo in GEOMETRIES for fmt in MEMORY_FORMATS for ranks in ("uniform", "varying")
    for layout in ("auto", "gather", "replicate")
    if not (layout == "replicate" and GEOMETRIES[geo][3].get("groups", 1) > 1)
]


@pytest.mark.parametrize("geometry, fmt, ranks, layout", LAYOUT_CASES)
def test_layouts_equal_dense_conv_in_both_memory_formats(
    geometry: str, fmt: str, ranks: str, layout: str
) -> None:
    """Exactly representable weight (rank g_c per channel, G = sum g_c): every layout computes
    the dense conv, in NCHW and channels_last, and a channels_last input stays channels_last."""
    c, m, k, kw_ = GEOMETRIES[geometry]
    groups = kw_.get("groups", 1)
    gen = torch.Generator().manual_seed(len(geometry) + 7 * len(ranks))
    r = [2] * c if ranks == "uniform" else [1 + i % 3 for i in range(c)]
    w = _low_rank_weight(m, r, *k, gen, groups)
    conv = nn.Conv2d(c, m, k, groups=groups, **{a: b for a, b in kw_.items() if a != "groups"})
    with torch.no_grad():
        conv.weight.copy_(w)
    f = mego(w, None, sum(r), groups=groups)
    assert f.counts().tolist() == r  # the allocation found the exact ranks
    layer = GDWSConv2d.from_factors(
        f, bias=conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        padding_mode=conv.padding_mode, layout=layout,
    )
    expected = "gather" if groups > 1 or (layout == "auto" and ranks == "varying") else (
        "replicate" if layout == "auto" else layout)
    assert layer.layout == expected
    mf = MEMORY_FORMATS[fmt]
    x = torch.randn(2, c, 9, 10, generator=gen).contiguous(memory_format=mf)
    conv, layer = conv.to(memory_format=mf), layer.to(memory_format=mf)
    with torch.no_grad():
        ref, out = conv(x), layer(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6
    if fmt == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(layer.dense_weight(), w, atol=1e-5)


def test_replicate_pads_varying_ranks_and_counts_padding() -> None:
    gen = torch.Generator().manual_seed(3)
    w = _low_rank_weight(8, [1, 3, 2, 1], 3, 3, gen)
    f = mego(w, None, 7)
    layer = GDWSConv2d.from_factors(f, bias=None, padding=1, layout="replicate")
    assert layer.num_components == 3 * 4 and layer.replicas == 3
    assert layer.macs_per_pixel == 12 * (9 + 8)
    # the padding components are zero; the 7 real ones are the factors'
    assert int((layer.dw_weight.reshape(12, -1).abs().sum(1) > 0).sum()) == 7
    gathered = GDWSConv2d.from_factors(f, bias=None, padding=1, layout="gather")
    assert gathered.num_components == 7
    x = torch.randn(1, 4, 6, 6, generator=gen)
    with torch.no_grad():
        assert (layer(x) - gathered(x)).abs().max() <= 1e-5 * gathered(x).abs().max()


def test_replicate_rejects_groups_and_unknown_layout() -> None:
    f = mego(torch.randn(4, 2, 3, 3), None, 8, groups=2)
    with pytest.raises(ValueError, match="groups"):
        GDWSConv2d.from_factors(f, bias=None, layout="replicate")
    with pytest.raises(ValueError, match="layout"):
        GDWSConv2d.from_factors(f, bias=None, layout="interleaved")
    with pytest.raises(ValueError, match="layout"):
        GDWSConv2d(4, 4, 3, num_components=8, layout="nope")


def test_replicate_matches_legacy_multiplier_layout() -> None:
    """The former no-gather layout (channel multiplier, channel-major; what files saved before
    ``layout`` existed hold: ``gather=False`` and no ``layout``) gives the same numbers."""
    gen = torch.Generator().manual_seed(5)
    w = _low_rank_weight(16, [2] * 8, 3, 3, gen)
    b = torch.randn(16, generator=gen)
    f = mego(w, None, 16)
    new = GDWSConv2d.from_factors(f, bias=b, padding=1)
    cfg = {**new.config(), "gather": False}
    del cfg["layout"]
    legacy = GDWSConv2d(**cfg)
    assert legacy.layout == "multiplier" and legacy.replicas == 2
    with torch.no_grad():
        legacy.dw_weight.copy_(f.depthwise.reshape(16, 1, 3, 3))
        legacy.pw_weight.copy_(f.pointwise.t().reshape(16, 16, 1, 1))
        legacy.bias.copy_(b)
    x = torch.randn(2, 8, 12, 12, generator=gen)
    with torch.no_grad():
        ref = legacy(x)
        for mf in MEMORY_FORMATS.values():
            out = new.to(memory_format=mf)(x.contiguous(memory_format=mf))
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(legacy.dense_weight(), new.dense_weight(), atol=1e-6)


# ----------------------------------------------------------------------------- convert


def _perturb_bn(model: nn.Module) -> None:
    """timm zero-inits the last BN of residual blocks; make every branch matter."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=10).eval()
    _perturb_bn(m)
    return m


def test_convert_resnet18(resnet18: nn.Module) -> None:
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    new, report = convert(resnet18, budget=0.2)
    # input untouched
    assert all(torch.equal(before[k], v) for k, v in resnet18.state_dict().items())
    assert not any(isinstance(m, GDWSConv2d) for m in resnet18.modules())
    replaced = [r for r in report if r.replaced]
    assert len(replaced) == 16  # every 3x3 conv but the stem
    assert {r.name for r in report if not r.replaced} == {
        "conv1", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"
    }
    assert all(r.mac_reduction > 1 for r in replaced)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = new(x), resnet18(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert not torch.allclose(out, ref)  # 20 % of the rank does change the function
    assert count_macs(new, x) < count_macs(resnet18, x)
    table = format_report(report)
    assert "layer1.0.conv1" in table and "first conv" in table
    # reported error equals the measured weighted Frobenius error of the installed module
    for r in replaced[:4]:
        w = resnet18.get_submodule(r.name).weight.detach()
        layer = new.get_submodule(r.name)
        assert isinstance(layer, GDWSConv2d)
        measured = _weighted_error(w, layer.dense_weight().detach(), torch.ones(w.shape[1]), 1)
        assert measured == pytest.approx(r.weighted_error, rel=1e-4)


def test_convert_full_rank_resnet18_matches(resnet18: nn.Module) -> None:
    new, report = convert(resnet18, beta=0.0, only_if_cheaper=False)
    assert sum(r.replaced for r in report) == 16
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (new(x) - resnet18(x)).abs().max() <= 1e-4
    # at full rank the GDWS form is never cheaper, so the default keeps the convs
    kept, rep2 = convert(resnet18, beta=0.0)
    assert not any(r.replaced for r in rep2)
    assert all("not cheaper" in r.reason for r in rep2 if r.kernel_size == (3, 3)
               and r.name != "conv1")


def test_convert_efficientnet_b0_runs_and_reports_depthwise() -> None:
    torch.manual_seed(0)
    m = timm.create_model("efficientnet_b0", num_classes=10).eval()
    new, report = convert(m, budget=0.5, skip_first=False, only_if_cheaper=False)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert new(x).shape == (1, 10)
    dw = [r for r in report if r.groups == r.in_channels and r.groups > 1]
    assert dw and all(not r.replaced and "depthwise" in r.reason for r in dw)
    assert [r.name for r in report if r.replaced] == ["conv_stem"]


def test_convert_same_padding_and_std_convs_full_rank() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        StdConv2d(3, 8, 3, padding=1), nn.ReLU(),
        create_conv2d(8, 8, 3, stride=2, padding="same"), nn.ReLU(),  # timm Conv2dSame
        ScaledStdConv2dSame(8, 8, 3, stride=2),
    ).eval()
    new, rep = convert(net, budget=1.0, skip_first=False, only_if_cheaper=False)
    assert [r.kind for r in rep] == ["StdConv2d", "Conv2dSame", "ScaledStdConv2dSame"]
    assert all(r.replaced for r in rep)
    for x in [torch.rand(1, 3, 33, 31), torch.rand(2, 3, 32, 32)]:
        with torch.no_grad():
            assert (new(x) - net(x)).abs().max() <= 1e-4


def test_convert_leaves_unknown_conv_subclass_and_condconv() -> None:
    from timm.layers import CondConv2d

    class Weird(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    net = nn.Sequential(nn.Conv2d(3, 8, 3), Weird(8, 8, 3), CondConv2d(8, 8, 3, num_experts=2))
    new, report = convert(net, budget=1)
    assert [r.replaced for r in report] == [False, False, False]
    assert "forward" in report[1].reason and "CondConv2d" in report[2].reason
    assert type(new[1]) is Weird


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({}, "exactly one"),
        ({"beta": 1.0, "budget": 2}, "exactly one"),
        ({"beta": -0.1}, "beta"),
        ({"beta": float("inf")}, "beta"),
        ({"budget": 0}, "budget"),
        ({"budget": 0.0}, "fraction"),
        ({"budget": 1.5}, "fraction"),
        ({"budget": 10_000}, "full rank"),
        ({"budget": {"1": 4}}, "no entry"),
        ({"budget": 4, "alphas": {}}, "alphas"),
        ({"budget": 4, "alphas": {"1": torch.ones(3), "2": torch.ones(8)}}, "per input channel"),
    ],
)
def test_convert_rejects_bad_arguments(kwargs: dict, msg: str) -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=msg):
        convert(net, **kwargs)


def _rank2_net() -> nn.Sequential:
    """Stem + two 3x3 convs (BN, ReLU) whose weights have rank exactly 2 per input channel."""
    gen = torch.Generator().manual_seed(11)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Flatten(), nn.LazyLinear(4),
    )
    net(torch.zeros(1, 3, 8, 8))  # materialise the lazy linear
    with torch.no_grad():
        net[3].weight.copy_(_low_rank_weight(16, [2] * 8, 3, 3, gen))
        net[6].weight.copy_(_low_rank_weight(16, [2] * 16, 3, 3, gen))
    _perturb_bn(net)
    return net.eval()


@pytest.mark.parametrize("memory_format", [None, torch.channels_last])
@pytest.mark.parametrize("layout", ["auto", "replicate", "gather"])
def test_convert_layout_and_memory_format_exact_rank2(memory_format, layout: str) -> None:
    net = _rank2_net()
    new, report = convert(net, beta=1e-6, layout=layout, memory_format=memory_format)
    rep = [r for r in report if r.replaced]
    assert [r.num_components for r in rep] == [16, 32]  # G = 2C, exact
    layers = [m for m in new.modules() if isinstance(m, GDWSConv2d)]
    assert [m.layout for m in layers] == ["gather" if layout == "gather" else "replicate"] * 2
    cl = memory_format is torch.channels_last
    # (G, 1, K, K) / (M, G, 1, 1) strides are ambiguous; the stem's weight is not
    assert new[0].weight.is_contiguous(memory_format=torch.channels_last) == cl
    assert net[0].weight.is_contiguous()  # the input model is not touched
    x = torch.rand(2, 3, 8, 8)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = net(x), new(x)
        mid = new[:4](x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert mid.is_contiguous(memory_format=torch.channels_last) == cl


def test_convert_rejects_bad_layout_and_memory_format() -> None:
    net = _rank2_net()
    with pytest.raises(ValueError, match="layout"):
        convert(net, budget=2, layout="multiplier")
    with pytest.raises(ValueError, match="memory_format"):
        convert(net, budget=2, memory_format=torch.channels_last_3d)


def test_save_load_keeps_replicate_layout(tmp_path) -> None:
    net = _rank2_net()
    new, _ = convert(net, beta=1e-6, memory_format=torch.channels_last)
    path = tmp_path / "r2.pt"
    save_converted(new, path, arch=None)
    back = load_converted(path, build=_rank2_net)
    assert [m.layout for m in back.modules() if isinstance(m, GDWSConv2d)] == ["replicate"] * 2
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(back(x), new(x), atol=1e-6)


# ----------------------------------------------------------------------------- alphas


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 4, (3, 2), padding="same", groups=2)
        self.c3 = Conv2dSame(4, 5, 3, stride=2)
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        return self.fc(x.mean((2, 3)))


def _naive_alphas(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: str, top: int | None = None
) -> dict[str, torch.Tensor]:
    """One sample and one competitor at a time, gradients from autograd on the weights."""
    names = ["c1", "c2", "c3"]
    acc = {n: torch.zeros(getattr(model, n).in_channels, dtype=torch.float64) for n in names}
    for i in range(x.shape[0]):
        with torch.no_grad():
            z0 = model(x[i:i + 1])[0]
        t = int(z0.argmax()) if target == "predicted" else int(y[i])
        others = sorted((j for j in range(5) if j != t), key=lambda j: -float(z0[j]))
        for j in others[:top]:
            z = model(x[i:i + 1])[0]
            margin = z[t] - z[j]
            grads = torch.autograd.grad(margin, [getattr(model, n).weight for n in names])
            for n, gw in zip(names, grads, strict=True):
                conv = getattr(model, n)
                g = conv.groups
                mg, cg = conv.out_channels // g, conv.in_channels // g
                kk = conv.kernel_size[0] * conv.kernel_size[1]
                for c in range(conv.in_channels):
                    gi, cl = divmod(c, cg)
                    sq = gw[gi * mg:(gi + 1) * mg, cl].double().square().sum()
                    acc[n][c] += sq / (2 * margin.double() ** 2 * mg * kk)
    return {n: (v / x.shape[0]).float() for n, v in acc.items()}


@pytest.mark.parametrize("target, max_classes", [("predicted", None), ("label", None),
                                                 ("label", 3)])
def test_compute_alphas_matches_per_sample_loop(target: str, max_classes: int | None) -> None:
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():  # non-trivial BN statistics, then eval
        model.bn.running_mean.uniform_(-0.2, 0.2)
    model.train()
    x, y = torch.rand(6, 3, 9, 11), torch.randint(0, 5, (6,))
    alphas = compute_alphas(model, (x, y), attack=None, n_samples=6, batch_size=4,
                            pair_chunk=7, max_classes=max_classes, target=target,
                            progress=False)
    assert model.training  # mode restored
    assert set(alphas) == {"c1", "c2", "c3"}
    model.eval()
    ref = _naive_alphas(model, x, y, target, None if max_classes is None else max_classes - 1)
    for n in ref:
        assert torch.allclose(alphas[n], ref[n], rtol=1e-3, atol=1e-8), n


def test_compute_alphas_default_pgd_uses_adversarial_samples() -> None:
    torch.manual_seed(0)
    model = _Tiny().eval()
    x, y = torch.rand(4, 3, 12, 12), torch.randint(0, 5, (4,))
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    torch.manual_seed(1)
    adv = compute_alphas(model, loader, n_samples=4, progress=False)  # torchattacks PGD
    clean = compute_alphas(model, loader, attack="none", n_samples=4, progress=False)
    assert set(adv) == set(clean) == {"c1", "c2", "c3"}
    assert all(torch.isfinite(a).all() and (a >= 0).all() for a in adv.values())
    assert any(not torch.allclose(adv[n], clean[n]) for n in adv)
    # an explicit callable attack gets (x, y) and its output is what is measured
    same = compute_alphas(model, loader, attack=lambda xb, yb: xb, n_samples=4, progress=False)
    assert all(torch.allclose(same[n], clean[n]) for n in clean)


def test_compute_alphas_resnet18_then_weighted_convert(resnet18: nn.Module) -> None:
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 10, (2,))
    alphas = compute_alphas(resnet18, (x, y), attack=None, n_samples=2, max_classes=3,
                            progress=False)
    assert len(alphas) == 16
    assert all(a.shape == (resnet18.get_submodule(n).in_channels,) for n, a in alphas.items())
    assert all(torch.isfinite(a).all() and (a >= 0).all() and a.sum() > 0
               for a in alphas.values())
    new, report = convert(resnet18, budget=0.2, alphas=alphas)
    r = next(r for r in report if r.replaced)
    w = resnet18.get_submodule(r.name).weight.detach()
    measured = _weighted_error(w, new.get_submodule(r.name).dense_weight().detach(),
                               alphas[r.name], 1)
    assert measured == pytest.approx(r.weighted_error, rel=1e-4)


# ----------------------------------------------------------------------------- save / load, CLI


def test_save_load_converted_weights_only(tmp_path, resnet18: nn.Module) -> None:
    new, report = convert(resnet18, budget=0.3)
    path = tmp_path / "gdws.pt"
    save_converted(new, path, extra={"budget": 0.3})
    back = load_converted(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), new.eval()(x))
    payload = torch.load(path, weights_only=True)
    assert payload["backbone"]["name"] == "resnet18" and payload["extra"] == {"budget": 0.3}


def test_cli_gdws_timm_model(tmp_path, resnet18: nn.Module, capsys) -> None:
    from oat_plugins.cli import gdws as cli_gdws

    ckpt = tmp_path / "sd.pt"
    torch.save(resnet18.state_dict(), ckpt)
    parser = argparse.ArgumentParser(prog="oat-plugins")
    cli_gdws.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out.pt"
    args = parser.parse_args([
        "gdws", "--checkpoint", str(ckpt), "--timm-model", "resnet18", "--num-classes", "10",
        "--beta", "2.0", "--out", str(out),
    ])
    assert args.func(args) == 0
    assert "layer1.0.conv1" in capsys.readouterr().out
    model = load_converted(out)
    ref, _ = convert(resnet18, beta=2.0)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.eval()(x), atol=1e-6)
    with pytest.raises(SystemExit):
        parser.parse_args(["gdws", "--checkpoint", str(ckpt), "--out", str(out)])
    bad = parser.parse_args([
        "gdws", "--checkpoint", str(ckpt), "--timm-model", "resnet18", "--num-classes", "10",
        "--beta", "-1", "--out", str(out),
    ])
    assert bad.func(bad) == 2


def test_cli_gdws_conditional_checkpoint(tmp_path) -> None:
    """The real path: oat_plugins.save -> `oat-plugins gdws` -> load_converted (weights_only)."""
    import oat_plugins
    from oat_plugins.cli import gdws as cli_gdws

    backbone = timm.create_model("resnet10t", num_classes=10)
    _perturb_bn(backbone)
    cond = oat_plugins.wrap(backbone, method="film")
    ckpt = tmp_path / "cond.pt"
    oat_plugins.save(cond, ckpt)
    parser = argparse.ArgumentParser(prog="oat-plugins")
    cli_gdws.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "gdws.pt"
    args = parser.parse_args(["gdws", "--checkpoint", str(ckpt), "--lambda", "0.5",
                              "--budget", "0.25", "--out", str(out)])
    assert args.func(args) == 0
    model = load_converted(out)
    ref, _ = convert(oat_plugins.load(ckpt).export(0.5), budget=0.25)
    assert any(isinstance(m, GDWSConv2d) for m in model.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.eval()(x), atol=1e-5)


def test_cli_main_dispatches_gdws(tmp_path, capsys) -> None:
    """Through the package's `oat-plugins` entry point, with its real command registry."""
    import oat_plugins.cli as cli

    assert "gdws" in cli.COMMANDS
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "gdws" in capsys.readouterr().out
    ckpt = tmp_path / "sd.pt"
    torch.save(timm.create_model("resnet10t", num_classes=4).state_dict(), ckpt)
    out = tmp_path / "o.pt"
    assert cli.main(["gdws", "--checkpoint", str(ckpt), "--timm-model", "resnet10t",
                     "--num-classes", "4", "--budget", "0.1", "--out", str(out)]) == 0
    assert "replaced" in capsys.readouterr().out
    assert any(isinstance(m, GDWSConv2d) for m in load_converted(out).modules())
    assert cli.main(["gdws", "--checkpoint", str(ckpt), "--timm-model", "resnet10t",
                     "--num-classes", "4", "--budget", "0", "--out", str(out)]) == 2
    assert "budget" in capsys.readouterr().err
