"""A fixed binary weight mask W ↦ W ⊙ M as a ``torch.nn.utils.parametrize`` parametrization.
Which entries to keep is chosen by :mod:`oat_plugins.layers.mask_selection`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import FoldableParametrization, FoldCache, parametrizations_of


class WeightMask(FoldableParametrization):
    """W ↦ W ⊙ M with M a boolean buffer saved in the checkpoint.

    Masked entries of the effective weight are exactly zero whatever happens to the
    underlying parameter; their gradient is zero too, so an optimizer with weight decay and
    momentum keeps a parameter that starts at zero there at zero (:func:`apply_mask` zeroes it).

    ``mask=None`` creates a *pending* mask (all ones) for masks that need data to be chosen
    (e.g. SNIP saliency): the forward raises until :meth:`set_mask` is called. The pending
    flag is saved in the checkpoint.

    When no gradient can reach the weight, the masked weight is cached per input weight
    (:class:`~oat_plugins.layers.base.FoldCache`): after a folded W + α·λ·η, the whole
    chain costs nothing per forward at a scalar λ.
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
        self._masked: FoldCache[torch.Tensor] = FoldCache()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.pending:
            raise RuntimeError(
                "this weight mask has not been chosen yet (a data-driven pruning criterion "
                "such as prune='snip' needs a batch): call model.method.prepare(model, x, y) "
                "(oat_plugins.train.fit does) first"
            )
        if torch.is_grad_enabled() and weight.requires_grad:
            return weight * self.mask
        # No gradient can reach the weight through the product (no_grad, inference mode, or
        # an input already folded at a scalar λ, e.g. inside model.frozen()): mask it once
        # per input weight instead of every forward.
        return self._masked.get(None, (weight, self.mask), lambda: weight * self.mask)

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
    return parametrizations_of(root, WeightMask)


@torch.no_grad()
def masked_density(root: nn.Module) -> float | None:
    """Fraction of entries kept over all masked weights under ``root`` (None when nothing is
    masked)."""
    found = weight_masks(root)
    if not found:
        return None
    kept = sum(int(m.mask.sum()) for _, _, m in found)
    return kept / sum(m.mask.numel() for _, _, m in found)
