"""Dual normalisation routed per sample by λ == 0 (clean branch) vs λ > 0 (robust branch)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..condition import Condition
from .base import ConditionedModule, FoldCache

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

    ``interpolate=True`` (opt-in, FLOAT's ``norm_rule='interpolate'``) replaces that rule by
    ``(1 − λ)·clean(x) + λ·robust(x)`` for 0 < λ < 1 (λ = 0 and λ = 1 unchanged): the norm
    moves with λ instead of switching at λ > 0. Not combined with ``post``.
    """

    def __init__(self, norm: nn.Module, condition: Condition, post: nn.Module | None = None,
                 interpolate: bool = False):
        super().__init__(condition)
        if interpolate and post is not None:
            raise ValueError("DualNorm: interpolate=True cannot be combined with a post module")
        self.interpolate = interpolate
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
        if self.interpolate:
            return self._interpolated(x)
        if self.condition.is_scalar:
            return (self.clean if self.condition.lam == 0 else self.robust)(x)
        n_clean = self.condition.clean_count(x)
        if n_clean == x.shape[0]:
            return self.clean(x)
        if n_clean == 0:
            return self.robust(x)
        clean = self.condition.clean_mask(x)
        from_clean, from_robust = self.clean(x[clean]), self.robust(x[~clean])
        # Under autocast a norm may return float32 for half inputs (GroupNorm, LayerNorm):
        # the combined output takes the branches' dtype, not the input's.
        out = x.new_empty(x.shape, dtype=torch.promote_types(from_clean.dtype, from_robust.dtype))
        out[clean] = from_clean.to(out.dtype)
        out[~clean] = from_robust.to(out.dtype)
        return out

    def _interpolated(self, x: torch.Tensor) -> torch.Tensor:
        """(1 − λ_i)·clean(x_i) + λ_i·robust(x_i); each branch sees only the samples with a
        non-zero weight on it (so its batch statistics are those of the samples it serves)."""
        if self.condition.is_scalar:
            lam = self.condition.lam
            if lam in (0.0, 1.0):
                return (self.clean if lam == 0 else self.robust)(x)
            return (1.0 - lam) * self.clean(x) + lam * self.robust(x)
        lam = self.condition.values(x)
        weight = lam.view(-1, *([1] * (x.dim() - 1)))
        on_clean, on_robust = lam < 1, lam > 0
        out = torch.zeros_like(x)
        if bool(on_clean.any()):
            out[on_clean] = (1 - weight[on_clean]) * self.clean(x[on_clean])
        if bool(on_robust.any()):
            out[on_robust] = out[on_robust] + weight[on_robust] * self.robust(x[on_robust])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.condition.serves_folded:
            # The export's own module (branch with FiLM folded into its affine), built once
            # per λ: a plain norm's cost. Eval mode only: a copy must not track statistics.
            return self._folded.get(self.condition.lam, (),
                                    lambda: self.fold().requires_grad_(False), module=self)(x)
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
        lam = self.condition.lam
        if self.interpolate and 0.0 < lam < 1.0:
            norm = mixed_norm(self.clean, self.robust, lam)
        else:
            norm = copy.deepcopy(self.clean if lam == 0 else self.robust)
        if self.post is not None:
            self.post.fold_into(norm)
        if self.act is not None:
            norm.drop, norm.act = copy.deepcopy(self.drop), copy.deepcopy(self.act)
        return norm


@torch.no_grad()
def mixed_norm(clean: nn.Module, robust: nn.Module, lam: float) -> nn.Module:
    """One norm of the same class computing ``(1 − λ)·clean(x) + λ·robust(x)`` in eval mode.

    Both branches normalise alike (GroupNorm, LayerNorm) or are per-channel affine maps in
    eval mode (BatchNorm with running statistics), so the mix is one affine: for BatchNorm
    the running statistics become (0, 1 − eps) and the affine carries the mixed scale and
    shift."""
    norm = copy.deepcopy(clean)
    if isinstance(clean, nn.BatchNorm2d):
        if clean.running_mean is None or robust.running_mean is None:
            raise ValueError("cannot fold an interpolated BatchNorm without running statistics")
        scales, shifts = [], []
        for branch in (clean, robust):
            weight = branch.weight if branch.affine else torch.ones_like(branch.running_var)
            bias = branch.bias if branch.affine else torch.zeros_like(branch.running_mean)
            scale = weight / torch.sqrt(branch.running_var + branch.eps)
            scales.append(scale)
            shifts.append(bias - branch.running_mean * scale)
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        scale = (1 - lam) * scales[0] + lam * scales[1]
        shift = (1 - lam) * shifts[0] + lam * shifts[1]
        if not norm.affine:
            norm.affine = True
            norm.weight, norm.bias = nn.Parameter(scale.clone()), nn.Parameter(shift.clone())
        else:
            norm.weight.copy_(scale)
            norm.bias.copy_(shift)
        return norm
    for name in ("weight", "bias"):
        mine, theirs = getattr(norm, name, None), getattr(robust, name, None)
        if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor):
            mine.mul_(1 - lam).add_(lam * theirs)
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
