"""One-shot mask selection, shared by every mask method: score the weights (magnitude, or
SNIP-style saliency measured where it is informative), keep the top entries at a density.

Masks are chosen once (non-iterative pruning). Re-choosing a mask only ever removes weights:
an entry that is already pruned (its weight zeroed) is never revived.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dual_norm import is_norm

PRUNE_SCOPES = ("layer", "global")


def check_density(density: float) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)) \
            or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be a number in (0, 1] (fraction of weights kept), "
                         f"got {density!r}")


def check_scope(scope: str) -> None:
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"unknown prune_scope {scope!r}; choose one of {list(PRUNE_SCOPES)}")


def magnitude_scores(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """|W|: keeps the largest weights."""
    return [w.detach().abs() for w in weights]


def saliency_scores(
    model: nn.Module,
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> list[torch.Tensor]:
    """SNIP saliency |∂L/∂W ⊙ W| of ``weights`` for the cross-entropy of ``model(x)`` against
    ``y``, in the model's current mode and λ.

    Measured where it is informative: a norm whose affine weight is exactly zero (timm
    zero-initialises the last norm of every residual branch) passes no gradient into its
    branch, which would make every score there 0 and the mask an arbitrary tie-break; such
    norms count as one while measuring. Every parameter and buffer (e.g. BatchNorm running
    statistics) is restored afterwards. A layer whose scores are still all zero falls back
    to magnitude with a warning.
    """
    with _restored_state(model), torch.enable_grad():
        _open_zero_norms(model)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(weights), allow_unused=True)
    scores = []
    for index, (g, w) in enumerate(zip(grads, weights, strict=True)):
        score = None if g is None else (g * w).detach().abs()
        if score is None or not bool((score > 0).any()):
            warnings.warn(f"saliency of weight {index} (shape {tuple(w.shape)}) is zero "
                          "everywhere on this batch; its mask falls back to magnitude",
                          stacklevel=2)
            score = w.detach().abs()
        scores.append(score)
    return scores


@contextlib.contextmanager
def _restored_state(model: nn.Module) -> Iterator[None]:
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor)}
    try:
        yield
    finally:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if key in saved:
                    value.copy_(saved[key])


@torch.no_grad()
def _open_zero_norms(model: nn.Module) -> None:
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if is_norm(module) and isinstance(weight, torch.Tensor) and not bool(weight.any()):
            weight.fill_(1.0)


def masks_from_scores(
    scores: Sequence[torch.Tensor],
    density: float,
    scope: str = "layer",
    alive: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Boolean masks keeping the highest scores at ``density`` (fraction of all entries).

    ``scope='layer'``: each tensor keeps round(density·n) entries (at least one), so every
    layer stays alive and each layer's density is within 1/n of the target.
    ``scope='global'``: the top round(density·N) of all N scores together (layers of larger
    score scale keep more). Ties are broken by ``torch.topk``; exactly k entries are kept.
    ``alive``: boolean masks of the entries that may be kept (the others are pruned already
    and are never revived); asking for more than is alive is an error.
    """
    check_density(density)
    check_scope(scope)
    alive = [torch.ones_like(s, dtype=torch.bool) for s in scores] if alive is None else alive
    ranked = [torch.where(a, s.detach().float(), -torch.inf).flatten()
              for s, a in zip(scores, alive, strict=True)]
    if scope == "layer":
        return [_topk_mask(r, max(1, round(density * r.numel())), int(a.sum())).view_as(s)
                for r, a, s in zip(ranked, alive, scores, strict=True)]
    flat = torch.cat(ranked)
    n_alive = sum(int(a.sum()) for a in alive)
    keep = _topk_mask(flat, max(1, round(density * flat.numel())), n_alive)
    parts = keep.split([s.numel() for s in scores])
    return [m.view_as(s) for m, s in zip(parts, scores, strict=True)]


def _topk_mask(scores: torch.Tensor, k: int, n_alive: int) -> torch.Tensor:
    if k > n_alive:
        raise ValueError(
            f"cannot keep {k} of {scores.numel()} weights: only {n_alive} are not pruned "
            "already, and pruned weights are never revived (choose a lower density)"
        )
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores, k, sorted=False).indices] = True
    return mask
