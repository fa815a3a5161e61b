"""Network-level GDWS conversion: replace every eligible K x K conv of a model."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..surgery import set_submodule
from .core import GDWSFactors, full_rank, lego, mego
from .layer import GDWSConv2d, _pair

__all__ = [
    "ConvSpec",
    "GDWSLayerReport",
    "UnsupportedConv",
    "conv_spec",
    "convert",
    "eligible_convs",
    "format_report",
]

logger = logging.getLogger(__name__)

Budget = int | float | Mapping[str, int]


class UnsupportedConv(Exception):
    """A conv that GDWS leaves alone; the message says why."""


@dataclass
class ConvSpec:
    """What a conv module actually computes: the weight its forward uses and its geometry."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    same_pad: bool


def _std_weight(conv: nn.Conv2d, scaled: bool) -> torch.Tensor:
    """The weight timm's (Scaled)StdConv2d forward actually uses (same F.batch_norm call)."""
    w = conv.weight
    gain = (conv.gain * conv.scale).view(-1) if scaled else None
    return F.batch_norm(
        w.reshape(1, conv.out_channels, -1), None, None, weight=gain,
        training=True, momentum=0.0, eps=conv.eps,
    ).reshape_as(w)


def conv_spec(conv: nn.Module) -> ConvSpec:
    """Describe what ``conv`` computes, or raise :class:`UnsupportedConv` with the reason.

    Supported: ``nn.Conv2d`` itself, timm's ``Conv2dSame`` / ``Conv2dSameExport`` (dynamic "same"
    padding), ``StdConv2d`` / ``StdConv2dSame`` / ``ScaledStdConv2d`` / ``ScaledStdConv2dSame``
    (the standardised weight is approximated), and any of these under
    ``torch.nn.utils.parametrize`` (the parametrized weight is approximated). Any other
    ``nn.Conv2d`` subclass has an unknown forward and is refused.
    """
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    from timm.layers.std_conv import (
        ScaledStdConv2d,
        ScaledStdConv2dSame,
        StdConv2d,
        StdConv2dSame,
    )

    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedConv(f"{type(conv).__name__} is not an nn.Conv2d")
    cls = type(conv)
    if torch.nn.utils.parametrize.is_parametrized(conv):
        cls = cls.__bases__[0]  # parametrize creates a subclass of the original class
    same_pad = False
    with torch.no_grad():
        if cls is nn.Conv2d:
            weight = conv.weight
        elif cls in (Conv2dSame, Conv2dSameExport):
            weight, same_pad = conv.weight, True
        elif cls in (StdConv2d, StdConv2dSame):
            weight = _std_weight(conv, scaled=False)
            same_pad = bool(getattr(conv, "same_pad", False))
        elif cls in (ScaledStdConv2d, ScaledStdConv2dSame):
            weight = _std_weight(conv, scaled=True)
            same_pad = bool(getattr(conv, "same_pad", False))
        else:
            raise UnsupportedConv(
                f"{cls.__module__}.{cls.__qualname__} overrides forward in a way GDWS does not "
                "know; left unchanged"
            )
        weight = weight.detach().clone()
    if conv.padding_mode != "zeros" and isinstance(conv.padding, str):
        raise UnsupportedConv("string padding with a non-zero padding_mode")
    bias = conv.bias.detach().clone() if conv.bias is not None else None
    return ConvSpec(
        weight=weight, bias=bias, stride=tuple(conv.stride), padding=conv.padding
        if isinstance(conv.padding, str) else tuple(conv.padding),
        dilation=tuple(conv.dilation), groups=conv.groups, padding_mode=conv.padding_mode,
        same_pad=same_pad,
    )


def _skip_reason(name: str, conv: nn.Conv2d, min_kernel: int) -> str | None:
    kh, kw = conv.kernel_size
    if max(kh, kw) < min_kernel:
        return f"kernel {kh}x{kw} smaller than min_kernel={min_kernel}"
    if conv.groups == conv.in_channels:
        return (
            "depthwise conv (groups == in_channels): each input channel has rank "
            f"<= out/groups = {conv.out_channels // conv.groups}, already separable; "
            "GDWS cannot lower its cost"
        )
    try:
        conv_spec(conv)
    except UnsupportedConv as e:
        return str(e)
    return None


def eligible_convs(
    model: nn.Module, skip_first: bool = True, min_kernel: int = 2
) -> tuple[dict[str, nn.Conv2d], dict[str, str]]:
    """Split a model's ``nn.Conv2d`` modules into eligible ones and skipped ones (with reasons).

    The *first conv* is the first ``nn.Conv2d`` in ``model.named_modules()`` order (the stem of
    timm models). A conv is eligible when ``max(Kh, Kw) >= min_kernel``, it is not depthwise and
    :func:`conv_spec` understands it. Grouped (non-depthwise) convs are eligible and handled per
    group.

    Returns:
        ``(eligible, skipped)``: name -> module, and name -> reason.
    """
    if not isinstance(min_kernel, int) or min_kernel < 1:
        raise ValueError(f"min_kernel must be an int >= 1; got {min_kernel!r}")
    eligible: dict[str, nn.Conv2d] = {}
    skipped: dict[str, str] = {}
    first = True
    from timm.layers import CondConv2d

    for name, m in model.named_modules():
        if isinstance(m, GDWSConv2d):
            skipped[name] = "already a GDWSConv2d"
            first = False
            continue
        if isinstance(m, CondConv2d):
            skipped[name] = "CondConv2d mixes expert weights per sample; no fixed weight"
            first = False
            continue
        if not isinstance(m, nn.Conv2d):
            continue
        if first and skip_first:
            skipped[name] = "first conv (skip_first=True)"
            first = False
            continue
        first = False
        reason = _skip_reason(name, m, min_kernel)
        if reason is None:
            eligible[name] = m
        else:
            skipped[name] = reason
    return eligible, skipped


@dataclass
class GDWSLayerReport:
    """One row of the conversion report.

    ``macs_original`` / ``macs_gdws`` are MACs per output pixel (``C*K^2*M/groups`` and
    ``G*(K^2 + M/groups)`` with G as implemented); ``weighted_error`` is
    ``sum_c alpha_c ||W_c - What_c||_F^2``.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    groups: int
    replaced: bool
    reason: str = ""
    full_rank: int = 0
    num_components: int = 0
    macs_original: int = 0
    macs_gdws: int = 0
    weighted_error: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mac_reduction(self) -> float:
        """``macs_original / macs_gdws`` (1.0 for a layer left unchanged)."""
        if not self.replaced or self.macs_gdws == 0:
            return 1.0
        return self.macs_original / self.macs_gdws


def format_report(report: list[GDWSLayerReport]) -> str:
    """Markdown table of a conversion report, with a total line over replaced layers."""
    lines = [
        "| layer | type | C→M | K | groups | G / full | MACs/px orig → gdws | reduction "
        "| weighted error | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report:
        k = f"{r.kernel_size[0]}x{r.kernel_size[1]}"
        if r.replaced:
            lines.append(
                f"| {r.name} | {r.kind} | {r.in_channels}→{r.out_channels} | {k} | {r.groups} "
                f"| {r.num_components} / {r.full_rank} | {r.macs_original} → {r.macs_gdws} "
                f"| {r.mac_reduction:.2f}x | {r.weighted_error:.4g} | {r.reason} |"
            )
        else:
            lines.append(
                f"| {r.name} | {r.kind} | {r.in_channels}→{r.out_channels} | {k} | {r.groups} "
                f"| – | {r.macs_original} | 1.00x | – | kept: {r.reason} |"
            )
    rep = [r for r in report if r.replaced]
    if rep:
        o = sum(r.macs_original for r in rep)
        g = sum(r.macs_gdws for r in rep)
        e = sum(r.weighted_error for r in rep)
        lines.append(
            f"| **replaced ({len(rep)})** | | | | | | {o} → {g} | {o / g:.2f}x | {e:.4g} | "
            "per-pixel sums |"
        )
    return "\n".join(lines)


def _layer_budget(budget: Budget, name: str, n_full: int) -> int:
    if isinstance(budget, Mapping):
        if name not in budget:
            raise ValueError(f"budget mapping has no entry for layer {name!r}")
        b = budget[name]
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n_full:
            raise ValueError(f"budget[{name!r}] must be an int in [1, {n_full}]; got {b!r}")
        return b
    if isinstance(budget, float):
        return max(1, math.ceil(budget * n_full - 1e-9))
    if budget > n_full:
        raise ValueError(
            f"budget={budget} exceeds the full rank {n_full} of layer {name!r}; use an int in "
            "[1, smallest full rank], a fraction in (0, 1], or a per-layer mapping"
        )
    return budget


def _validate(beta: float | None, budget: Budget | None) -> None:
    if (beta is None) == (budget is None):
        raise ValueError(
            "give exactly one of beta (error bound >= 0, LEGO) or budget (MEGO: int G >= 1 per "
            "layer, float fraction of full rank in (0, 1], or {layer: G})"
        )
    if beta is not None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise ValueError(f"beta must be a finite number >= 0; got {beta!r}")
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta must be a finite number >= 0; got {beta}")
    if budget is not None and not isinstance(budget, Mapping):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"budget must be an int, a float or a mapping; got {budget!r}")
        if isinstance(budget, float) and not (0.0 < budget <= 1.0):
            raise ValueError(f"a float budget is a fraction of full rank in (0, 1]; got {budget}")
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"an int budget is G per layer, >= 1; got {budget}")


def _validate_layout(layout: str, memory_format: torch.memory_format | None) -> None:
    if layout not in ("auto", "gather", "replicate"):
        raise ValueError(f"layout must be 'auto', 'gather' or 'replicate'; got {layout!r}")
    allowed = (torch.contiguous_format, torch.channels_last)
    if memory_format is not None and memory_format not in allowed:
        raise ValueError(
            "memory_format must be None, torch.contiguous_format or torch.channels_last; got "
            f"{memory_format!r}"
        )


def convert(
    model: nn.Module,
    beta: float | None = None,
    budget: Budget | None = None,
    alphas: Mapping[str, torch.Tensor] | None = None,
    skip_first: bool = True,
    min_kernel: int = 2,
    only_if_cheaper: bool = True,
    layout: str = "auto",
    memory_format: torch.memory_format | None = None,
) -> tuple[nn.Module, list[GDWSLayerReport]]:
    """Replace every eligible K x K conv of a copy of ``model`` by a :class:`GDWSConv2d`.

    Give exactly one of:
        beta: network-level error bound (LEGO per layer with the same beta; the weighted errors
            are comparable across layers when ``alphas`` come from :func:`compute_alphas`).
        budget: MEGO per layer. An ``int`` is G for every eligible layer (must not exceed any
            layer's full rank); a ``float`` in (0, 1] is a fraction of each layer's full rank
            ``C*min(M/groups, K^2)`` (``ceil``, at least 1); a mapping gives G per layer name.

    Args:
        model: any module (a timm model, or ``ConditionalModel.export(lam)``). Not modified.
        alphas: per-layer ``(C,)`` weights from :func:`compute_alphas`, keyed by module name;
            ``None`` means alpha = 1 everywhere. If given, every eligible layer needs an entry.
        skip_first: leave the first conv (the stem) unchanged.
        min_kernel: only convs with ``max(Kh, Kw) >= min_kernel`` are considered (skips 1x1).
        only_if_cheaper: keep the original conv where the GDWS form would not need fewer MACs
            (e.g. near full rank: ``G*(K^2+M) >= C*K^2*M``).
        layout: :class:`GDWSConv2d` layout per layer: ``"auto"`` (no gather where every input
            channel keeps the same number of components, else a gather), ``"gather"``, or
            ``"replicate"`` (pads channels with zero components to the largest count instead of
            gathering; grouped convs still gather). See :meth:`GDWSConv2d.from_factors`.
        memory_format: if given (e.g. ``torch.channels_last``), the whole new model is converted
            to it (``new.to(memory_format=...)``); feed inputs in the same format. On CPU,
            ``channels_last`` is what makes the depthwise + 1 x 1 pair fast (docs/gdws.md).

    Returns:
        ``(new_model, report)``; the report has one :class:`GDWSLayerReport` per ``nn.Conv2d``.

    Raises:
        ValueError: on both/neither of beta and budget, a negative beta, a budget outside the
            allowed range, or alphas missing a layer / with the wrong length, an unknown layout
            or memory_format.
    """
    _validate(beta, budget)
    _validate_layout(layout, memory_format)
    eligible, skipped = eligible_convs(model, skip_first=skip_first, min_kernel=min_kernel)
    if alphas is not None:
        missing = [n for n in eligible if n not in alphas]
        if missing:
            raise ValueError(f"alphas has no entry for eligible layer(s): {missing}")
    new = copy.deepcopy(model)
    report: list[GDWSLayerReport] = []
    for name, conv in model.named_modules():
        if not (isinstance(conv, nn.Conv2d) or name in skipped):
            continue
        kh, kw = _pair(conv.kernel_size)
        groups = int(getattr(conv, "groups", 1))
        row = GDWSLayerReport(
            name=name, kind=type(conv).__name__, in_channels=conv.in_channels,
            out_channels=conv.out_channels, kernel_size=(kh, kw), groups=groups,
            replaced=False,
            macs_original=conv.in_channels * kh * kw * conv.out_channels // groups,
        )
        report.append(row)
        if name in skipped:
            row.reason = skipped[name]
            continue
        spec = conv_spec(conv)
        n_full = full_rank(spec.weight, spec.groups)
        row.full_rank = n_full
        alpha = None if alphas is None else alphas[name]
        if beta is not None:
            f: GDWSFactors = lego(spec.weight, alpha, float(beta), groups=spec.groups)
        else:
            f = mego(spec.weight, alpha, _layer_budget(budget, name, n_full), groups=spec.groups)
        layer = GDWSConv2d.from_factors(
            f, bias=spec.bias, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
            padding_mode=spec.padding_mode, same_pad=spec.same_pad,
            layout=layout if spec.groups == 1 else "auto",
        )
        row.num_components = layer.num_components
        row.weighted_error = f.error
        row.macs_gdws = layer.macs_per_pixel
        if layer.num_components != f.num_components:
            row.reason = (
                f"{layer.num_components - f.num_components} zero components pad the layout"
            )
        if only_if_cheaper and layer.macs_per_pixel >= row.macs_original:
            row.reason = (
                f"GDWS form not cheaper ({layer.macs_per_pixel} >= {row.macs_original} "
                f"MACs/px at G={layer.num_components})"
            )
            continue
        layer.train(conv.training)
        set_submodule(new, name, layer)
        row.replaced = True
    if memory_format is not None:
        new = new.to(memory_format=memory_format)
    n_rep = sum(r.replaced for r in report)
    logger.info("GDWS: replaced %d of %d convs", n_rep, len(report))
    return new, report
