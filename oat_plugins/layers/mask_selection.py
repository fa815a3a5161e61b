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


# -- two masks on one weight (SMART's clean and adversarial experts) ---------------------------
def random_scores(weights: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Uniform random scores, one tensor per weight, drawn on the CPU from a generator seeded
    from (``seed``, index): reproducible on any device and independent of the global RNG."""
    scores = []
    for index, w in enumerate(weights):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
        scores.append(torch.rand(w.shape, generator=generator).to(w.device))
    return scores


def check_pair(densities: tuple[float, float], overlap: float) -> None:
    """Raise ``ValueError`` unless two masks of these densities can share the fraction
    ``overlap`` of the smaller one's entries within one tensor (d₁ + d₂ − o·min(d₁, d₂) ≤ 1)."""
    for density in densities:
        check_density(density)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) \
            or not 0.0 <= float(overlap) <= 1.0:
        raise ValueError(f"overlap must be a number in [0, 1] (fraction of a path's kept "
                         f"weights shared with the other path), got {overlap!r}")
    d1, d2 = densities
    union = d1 + d2 - overlap * min(d1, d2)
    if union > 1.0 + 1e-9:
        raise ValueError(
            f"densities {d1:g} and {d2:g} with overlap {overlap:g} need {union:g} of the "
            f"weights (more than all of them); raise overlap to at least "
            f"{(d1 + d2 - 1.0) / min(d1, d2):.3g} or lower the densities")


def pair_counts(n: int, densities: tuple[float, float], overlap: float) -> tuple[int, int, int]:
    """(k₁, k₂, shared) entries of two masks on a tensor of ``n`` entries: kᵢ = round(dᵢ·n)
    (at least one), shared = round(overlap·min(k₁, k₂)), raised where rounding would need more
    than ``n`` entries (tiny tensors)."""
    k1, k2 = (min(n, max(1, round(d * n))) for d in densities)
    shared = round(overlap * min(k1, k2))
    return k1, k2, max(shared, k1 + k2 - n)


def mask_pair_from_scores(
    scores: tuple[torch.Tensor, torch.Tensor],
    densities: tuple[float, float],
    overlap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two boolean masks on one tensor, each keeping the entries its own scores rank high,
    with exactly the counts of :func:`pair_counts`.

    Each entry gets a *draft time* per mask: its rank in that mask's score order divided by
    the mask's quota (when a proportional draft would reach it). The shared entries are those
    with the earliest time for both (smallest max of the two); of the rest, each entry goes to
    the mask that would draft it first (ties, e.g. one score for both masks, are dealt
    alternately by rank), a mask over its quota keeps its earliest entries and a mask under
    it fills up from the unclaimed ones in its own order. With one score for both (magnitude)
    the two masks thus get alternate ranks rather than one taking all the largest weights.
    """
    s1, s2 = (s.detach().float().flatten() for s in scores)
    n = s1.numel()
    k1, k2, shared = pair_counts(n, densities, overlap)
    r1, r2 = _ranks(s1), _ranks(s2)
    t1, t2 = r1.double() / k1, r2.double() / k2
    both = _take(torch.maximum(t1, t2), shared, torch.ones(n, dtype=torch.bool, device=s1.device))
    free = ~both
    prefer1 = (t1 < t2) | ((t1 == t2) & (r1 % 2 == 0))
    only1 = _take(t1, k1 - shared, free & prefer1)
    only2 = _take(t2, k2 - shared, free & ~prefer1)
    # fill any deficit from what neither mask holds, in the mask's own order
    only1 |= _take(t1, k1 - shared - int(only1.sum()), free & ~only1 & ~only2)
    only2 |= _take(t2, k2 - shared - int(only2.sum()), free & ~only1 & ~only2)
    shape = scores[0].shape
    return (both | only1).view(shape), (both | only2).view(shape)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Position of each entry in descending score order (0 = highest)."""
    order = torch.argsort(scores, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def _take(time: torch.Tensor, k: int, allowed: torch.Tensor) -> torch.Tensor:
    """The ``k`` allowed entries with the smallest ``time`` (fewer if fewer are allowed)."""
    chosen = torch.zeros_like(allowed)
    k = min(k, int(allowed.sum()))
    if k > 0:
        ranked = torch.where(allowed, -time, -torch.inf)
        chosen[torch.topk(ranked, k, sorted=False).indices] = True
    return chosen
