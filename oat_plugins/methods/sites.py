"""Which weights a weight-conditioning method conditions (shared by ``float``/``floats`` and
``smart``): every convolution, linear layers by option or when they dominate, the classifier
head by option."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Convolutions whose weight is conditioned (timm subclasses such as Conv2dSame, StdConv2d
included; container convs such as CondConv2d are not)."""


def head_modules(backbone: nn.Module) -> set[int]:
    """ids of every module of the classifier head (``backbone.get_classifier()``)."""
    get = getattr(backbone, "get_classifier", None)
    if not callable(get):
        return set()
    head = get()
    heads = head if isinstance(head, (tuple, list)) else (head,)
    return {id(m) for h in heads if isinstance(h, nn.Module) for m in h.modules()}


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter)


def weight_sites(
    backbone: nn.Module, linear: bool | None, include_head: bool
) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers whose ``weight`` a method conditions, in module order
    grouped as convs, then linears, then the head.

    ``linear=None`` (auto) takes ``nn.Linear`` layers (the head excluded) only when they hold
    more weights than the convolutions (ViTs, ConvNeXt's MLPs). Weights that are already
    parametrized are skipped.
    """
    heads = head_modules(backbone)
    convs, linears, head = [], [], []
    for name, module in backbone.named_modules():
        if not _has_weight(module) or parametrize.is_parametrized(module, "weight"):
            continue
        if not isinstance(module, (*CONV_TYPES, nn.Linear)):
            continue
        if id(module) in heads:
            head.append((name, module))
        elif isinstance(module, nn.Linear):
            linears.append((name, module))
        else:
            convs.append((name, module))
    use_linear = linear
    if use_linear is None:
        conv_weights = sum(m.weight.numel() for _, m in convs)
        use_linear = sum(m.weight.numel() for _, m in linears) > conv_weights
    return convs + (linears if use_linear else []) + (head if include_head else [])
