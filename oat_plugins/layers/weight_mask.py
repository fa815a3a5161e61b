"""A fixed binary weight mask W ↦ W ⊙ M as a ``torch.nn.utils.parametrize`` parametrization,
and one-shot mask selection from scores (magnitude, saliency) at a target density."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import FoldableParametrization

PRUNE_SCOPES = ("layer", "global")


class WeightMask(FoldableParametrization):
    """W ↦ W ⊙ M with M a boolean buffer saved in the checkpoint.

    Masked entries of the effective weight are exactly zero whatever happens to the
    underlying parameter; their gradient is zero too, so an optimizer with weight decay and
    momentum keeps a parameter that starts at zero there at zero (:func:`apply_mask` zeroes it).

    ``mask=None`` creates a *pending* mask (all ones) for masks that need data to be chosen
    (e.g. SNIP saliency): the forward raises until :meth:`set_mask` is called. The pending
    flag is saved in the checkpoint.
    """

    def __init__(self, shape: Sequence[int], mask: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.pending = mask is None
        if mask is None:
            mask = torch.ones(tuple(shape), dtype=torch.bool, device=device)
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(shape)}")
        self.register_buffer("mask", mask.to(dtype=torch.bool, device=device or mask.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.pending:
            raise RuntimeError(
                "this weight mask has not been chosen yet (a data-driven pruning criterion "
                "such as prune='snip' needs a batch): call "
                "oat_plugins.methods.float.snip_prune(model, x, y) first"
            )
        return weight * self.mask

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (same shape) and clear the pending flag."""
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != {tuple(self.mask.shape)}")
        self.mask.copy_(mask.to(torch.bool))
        self.pending = False

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    def get_extra_state(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.pending = bool(state["pending"])

    def extra_repr(self) -> str:
        return f"density={self.density:.4f}" + (", pending" if self.pending else "")


def masks_from_scores(
    scores: Sequence[torch.Tensor], density: float, scope: str = "layer"
) -> list[torch.Tensor]:
    """Boolean masks keeping the highest scores at ``density`` (fraction kept).

    ``scope='layer'``: each tensor keeps round(density·n) entries (at least one), so every
    layer stays alive and each layer's density is within 1/n of the target.
    ``scope='global'``: the top round(density·N) of all N scores together (layers of larger
    score scale keep more). Ties are broken by ``torch.topk``; exactly k entries are kept.
    """
    check_density(density)
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"unknown prune scope {scope!r}; choose one of {list(PRUNE_SCOPES)}")
    if scope == "layer":
        return [_topk_mask(s.flatten(), max(1, round(density * s.numel()))).view_as(s)
                for s in scores]
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    keep = _topk_mask(flat, max(1, round(density * flat.numel())))
    parts = keep.split([s.numel() for s in scores])
    return [m.view_as(s) for m, s in zip(parts, scores, strict=True)]


def _topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.detach().float(), k, sorted=False).indices] = True
    return mask


def check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be a number in (0, 1] (fraction of weights kept), "
                         f"got {density!r}")


@torch.no_grad()
def apply_mask(module: nn.Module, mask: WeightMask, tensor_name: str = "weight") -> None:
    """Register ``mask`` as the last parametrization of ``module.<tensor_name>`` and zero the
    underlying parameter at masked positions (so weight decay and momentum keep it zero)."""
    pending = mask.pending
    mask.pending = False  # registration evaluates the parametrization once
    parametrize.register_parametrization(module, tensor_name, mask)
    mask.pending = pending
    original = module.parametrizations[tensor_name].original
    original.mul_(mask.mask.to(original.dtype))


def weight_masks(root: nn.Module) -> list[tuple[nn.Module, str, WeightMask]]:
    """(module, tensor name, mask) for every :class:`WeightMask` registered under ``root``."""
    found = []
    for module in root.modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                found += [(module, tensor_name, p) for p in plist if isinstance(p, WeightMask)]
    return found
