"""Dual normalisation routed per sample by λ == 0 (clean branch) vs λ > 0 (robust branch)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..condition import Condition
from .base import ConditionedModule, FoldCache, uses_folded

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
"""Norms a dual norm can replace; timm's BatchNormAct2d, LayerNorm2d and GroupNormAct subclass
these."""


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def carries_activation(norm: nn.Module) -> bool:
    """timm's norm-act layers (BatchNormAct2d, GroupNormAct, ...) apply ``drop`` then ``act``
    after normalising; anything inserted after the norm must go between the two."""
    return isinstance(getattr(norm, "act", None), nn.Module) and isinstance(
        getattr(norm, "drop", None), nn.Module
    )


def channel_dim(norm: nn.Module) -> int:
    """Dimension holding the channels a norm's affine acts on."""
    if isinstance(norm, nn.LayerNorm):
        # timm's LayerNorm2d / LayerNormAct2d permute (N, C, H, W) internally; a plain
        # LayerNorm acts on the last dimension (ViT tokens, ConvNeXt blocks in channels-last).
        return 1 if "2d" in type(norm).__name__.lower() else -1
    return 1


class DualNorm(ConditionedModule):
    """Two copies of one norm: ``clean`` for samples with λ == 0, ``robust`` for λ > 0.

    Routing is by a per-sample mask, never by sorting the batch, so it is correct with any
    batch order and under DistributedDataParallel. An optional ``post`` module (FiLM) runs on
    the normalised features before a carried activation. The rule at intermediate λ, shared
    by every method: any λ > 0 uses the robust branch.
    """

    def __init__(self, norm: nn.Module, condition: Condition, post: nn.Module | None = None):
        super().__init__(condition)
        norm = copy.deepcopy(norm)
        if carries_activation(norm):
            self.drop, self.act = norm.drop, norm.act
            norm.drop, norm.act = nn.Identity(), nn.Identity()
        else:
            self.drop = self.act = None
        self.clean = norm
        self.robust = copy.deepcopy(norm)
        self.post = post
        self._folded: FoldCache[nn.Module] = FoldCache()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.condition.is_scalar:
            return (self.clean if self.condition.lam == 0 else self.robust)(x)
        clean = self.condition.clean_mask(x)
        n_clean = int(clean.sum())
        if n_clean == x.shape[0]:
            return self.clean(x)
        if n_clean == 0:
            return self.robust(x)
        from_clean, from_robust = self.clean(x[clean]), self.robust(x[~clean])
        # Under autocast a norm may return float32 for half inputs (GroupNorm, LayerNorm):
        # the combined output takes the branches' dtype, not the input's.
        out = x.new_empty(x.shape, dtype=torch.promote_types(from_clean.dtype, from_robust.dtype))
        out[clean] = from_clean.to(out.dtype)
        out[~clean] = from_robust.to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and uses_folded(self, self.condition):
            # The export's own module (branch with FiLM folded into its affine), built once
            # per λ: a plain norm's cost. Eval mode only: a copy must not track statistics.
            sources = [*self.parameters(), *self.buffers()]
            return self._folded.get(self.condition.lam, sources,
                                    lambda: self.fold().requires_grad_(False))(x)
        x = self._normalise(x)
        if self.post is not None:
            x = self.post(x)
        if self.act is not None:
            x = self.act(self.drop(x))
        return x

    def fold(self) -> nn.Module:
        """The branch for the current scalar λ, with ``post`` folded into its affine and the
        carried activation put back: a module of the original norm's class."""
        if not self.condition.is_scalar:
            raise ValueError("fold needs a scalar λ")
        norm = copy.deepcopy(self.clean if self.condition.lam == 0 else self.robust)
        if self.post is not None:
            self.post.fold_into(norm)
        if self.act is not None:
            norm.drop, norm.act = copy.deepcopy(self.drop), copy.deepcopy(self.act)
        return norm


def norm_channels(norm: nn.Module) -> int:
    """Number of channels of a norm's per-channel affine."""
    if isinstance(norm, nn.BatchNorm2d):
        return norm.num_features
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[-1]
    raise TypeError(f"not a supported norm: {type(norm).__name__}")
