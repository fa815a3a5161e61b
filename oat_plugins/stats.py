"""Parameter statistics: non-zero counts (sparse models) and masked density."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .layers.weight_mask import weight_masks


class NonZero(NamedTuple):
    """Non-zero and total parameter counts."""

    nonzero: int
    total: int

    @property
    def density(self) -> float:
        return self.nonzero / max(self.total, 1)


@torch.no_grad()
def count_nonzero(module: nn.Module) -> NonZero:
    """Non-zero entries over all parameters of ``module`` (each shared tensor counted once).

    A parameter under a :class:`~oat_plugins.layers.weight_mask.WeightMask` parametrization
    counts only its unmasked non-zero entries, i.e. the non-zeros of the weight the model
    actually uses (at λ = 0 for weight-conditioned methods). Works on conditioned models and
    on plain (exported) ones alike.
    """
    masks: dict[int, torch.Tensor] = {}
    for mod, tensor_name, mask in weight_masks(module):
        original = mod.parametrizations[tensor_name].original
        prev = masks.get(id(original))
        masks[id(original)] = mask.mask if prev is None else prev & mask.mask
    nonzero = total = 0
    for p in module.parameters():
        keep = p != 0
        if id(p) in masks:
            keep = keep & masks[id(p)]
        nonzero += int(keep.sum())
        total += p.numel()
    return NonZero(nonzero, total)


@torch.no_grad()
def masked_density(module: nn.Module) -> float | None:
    """Fraction of entries kept over all masked weights (None when nothing is masked)."""
    found = weight_masks(module)
    if not found:
        return None
    kept = sum(int(m.mask.sum()) for _, _, m in found)
    return kept / sum(m.mask.numel() for _, _, m in found)
