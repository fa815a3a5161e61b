"""Exact per-layer GDWS allocation: MEGO (error-optimal for a budget) and LEGO (cost-optimal for
an error bound), after Dbouk & Shanbhag (NeurIPS 2021).

For a conv weight ``W`` of shape ``(M, C/groups, Kh, Kw)`` and global input channel ``c`` (in group
``j``), ``W_c`` is the ``(M/groups) x (Kh*Kw)`` matrix ``W[j*M/g:(j+1)*M/g, c - j*C/g]``
flattened over the kernel. Its thin SVD ``W_c = U S V^T`` has ``r = min(M/groups, Kh*Kw)``
rank-1 components; component ``k`` becomes one depthwise ``Kh x Kw`` kernel ``v_k`` applied to
channel ``c`` plus one pointwise column ``s_k * u_k``. Dropping component ``k`` of channel ``c``
adds exactly ``alpha_c * s_k**2`` to the weighted error ``sum_c alpha_c ||W_c - What_c||_F^2``
(orthogonality of the SVD), and every component costs the same, so:

* MEGO keeps the ``budget`` globally largest scores ``alpha_c * s_k**2`` (minimum error for a
  component count G = budget);
* LEGO drops the smallest scores, in ascending order, while their cumulative sum is ``<= beta``
  (minimum G for an error bound beta).

Both are exact optima; they work for ``M < Kh*Kw``, rectangular kernels and ``alpha = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["GDWSFactors", "channel_svd", "mego", "lego", "full_rank"]


@dataclass
class GDWSFactors:
    """Factors of a GDWS approximation of one conv weight.

    Attributes:
        channel_index: ``(G,)`` long, the global input channel of each kept component, sorted
            ascending (components of one channel are contiguous, strongest first).
        depthwise: ``(G, Kh, Kw)`` depthwise kernels (right singular vectors).
        pointwise: ``(G, M // groups)`` pointwise columns ``s_k * u_k``; component ``i`` feeds
            the output channels of the group of ``channel_index[i]``.
        error: the weighted error ``sum_c alpha_c ||W_c - What_c||_F^2`` of the approximation
            (sum of the dropped scores, computed in float64).
        out_channels: M.
        groups: the groups of the original conv.
        full_rank: number of components at full rank, ``C * min(M // groups, Kh*Kw)``.
        in_channels: C.
    """

    channel_index: torch.Tensor
    depthwise: torch.Tensor
    pointwise: torch.Tensor
    error: float
    out_channels: int
    groups: int
    full_rank: int
    in_channels: int

    @property
    def num_components(self) -> int:
        """G, the number of kept rank-1 components (depthwise channels)."""
        return int(self.channel_index.numel())

    def counts(self) -> torch.Tensor:
        """Components kept per input channel, ``(C,)`` long."""
        return torch.bincount(self.channel_index.cpu(), minlength=self.in_channels)

    def weight(self) -> torch.Tensor:
        """Reconstruct the approximated dense weight ``(M, C/groups, Kh, Kw)``."""
        m, g = self.out_channels, self.groups
        mg, cg = m // g, self.in_channels // g
        kh, kw = self.depthwise.shape[-2:]
        contrib = self.pointwise.unsqueeze(2) * self.depthwise.reshape(-1, 1, kh * kw)
        per_ch = torch.zeros(
            self.in_channels, mg, kh * kw, dtype=contrib.dtype, device=contrib.device
        ).index_add_(0, self.channel_index, contrib)
        # (C, Mg, K) -> (g, Cg, Mg, K) -> (g, Mg, Cg, K) -> (M, Cg, K)
        w = per_ch.reshape(g, cg, mg, kh * kw).permute(0, 2, 1, 3).reshape(m, cg, kh * kw)
        return w.reshape(m, cg, kh, kw)


def _check_weight(weight: torch.Tensor, groups: int) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
        raise ValueError(f"weight must be a 4-D tensor (M, C/groups, Kh, Kw); got {shape}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(
            f"groups must be a positive int dividing out_channels={weight.shape[0]}; got {groups}"
        )
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf")


def full_rank(weight: torch.Tensor, groups: int = 1) -> int:
    """Number of rank-1 components at full rank: ``C * min(M/groups, Kh*Kw)``."""
    _check_weight(weight, groups)
    m, cg, kh, kw = weight.shape
    return cg * groups * min(m // groups, kh * kw)


def channel_svd(
    weight: torch.Tensor, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD of every per-input-channel matrix ``W_c``, in float64.

    Computed from the eigendecomposition of the small Gram matrix (``W_c^T W_c`` if
    ``M/g >= Kh*Kw``, else ``W_c W_c^T``) in float64, which is exact up to float64 rounding
    relative to ``||W_c||^2`` for the squared singular values (what the errors are made of) and
    much faster than a batched LAPACK SVD for the tall, thin ``W_c`` of conv layers. The scaled
    left vectors ``U S`` are formed as ``W_c V`` (no division by small singular values).

    Returns:
        ``US (C, M/g, r)`` (columns ``s_k u_k``), ``S (C, r)`` (descending, >= 0) and
        ``Vh (C, r, Kh*Kw)`` with ``r = min(M/g, Kh*Kw)`` and C the (global) input channels.
    """
    _check_weight(weight, groups)
    m, cg, kh, kw = weight.shape
    mg, kk = m // groups, kh * kw
    w = weight.detach().to(torch.float64)
    # (M, Cg, K) -> (g, Mg, Cg, K) -> (g, Cg, Mg, K) -> (C, Mg, K)
    mats = w.reshape(groups, mg, cg, kk).permute(0, 2, 1, 3).reshape(groups * cg, mg, kk)
    if kk <= mg:
        lam, v = torch.linalg.eigh(mats.transpose(1, 2) @ mats)  # ascending
        lam, v = lam.flip(-1), v.flip(-1)
        s = lam.clamp_min(0).sqrt()
        us = mats @ v
        vh = v.transpose(1, 2)
    else:
        lam, u = torch.linalg.eigh(mats @ mats.transpose(1, 2))
        lam, u = lam.flip(-1), u.flip(-1)
        s = lam.clamp_min(0).sqrt()
        us = u * s.unsqueeze(1)
        wtu = mats.transpose(1, 2) @ u  # (C, K, r) = V S
        inv = torch.where(s > 0, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), 0.0)
        vh = (wtu * inv.unsqueeze(1)).transpose(1, 2)
    return us, s, vh


def _check_alpha(alpha: torch.Tensor | float | None, c: int) -> torch.Tensor:
    if alpha is None:
        return torch.ones(c, dtype=torch.float64)
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        a = torch.full((c,), float(alpha), dtype=torch.float64)
    elif isinstance(alpha, torch.Tensor):
        a = alpha.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if a.numel() == 1:
            a = a.expand(c).clone()
    else:
        raise ValueError(f"alpha must be None, a number or a tensor of shape ({c},); got {alpha!r}")
    if a.numel() != c:
        raise ValueError(f"alpha must have one value per input channel ({c}); got {a.numel()}")
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError("alpha must be finite and non-negative")
    return a


def _factors_from_keep(
    weight: torch.Tensor,
    groups: int,
    us: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    keep: torch.Tensor,
    error: float,
) -> GDWSFactors:
    """Build factors from a boolean keep mask ``(C, r)``."""
    m, cg, kh, kw = weight.shape
    c_idx, k_idx = keep.nonzero(as_tuple=True)  # row-major: sorted by channel, then by k
    dw = vh[c_idx, k_idx].reshape(-1, kh, kw)
    pw = us[c_idx, :, k_idx]
    return GDWSFactors(
        channel_index=c_idx.to(device=weight.device, dtype=torch.long),
        depthwise=dw.to(device=weight.device, dtype=weight.dtype),
        pointwise=pw.to(device=weight.device, dtype=weight.dtype),
        error=float(error),
        out_channels=m,
        groups=groups,
        full_rank=int(s.numel()),
        in_channels=cg * groups,
    )


def _scores(
    weight: torch.Tensor, alpha: torch.Tensor | float | None, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = channel_svd(weight, groups)
    a = _check_alpha(alpha, s.shape[0])
    return u, s, vh, a.to(s.device).unsqueeze(1) * s.square()


def mego(
    weight: torch.Tensor,
    alpha: torch.Tensor | float | None,
    budget: int,
    groups: int = 1,
) -> GDWSFactors:
    """MEGO: minimum weighted error with exactly ``budget`` components (G).

    Args:
        weight: conv weight ``(M, C/groups, Kh, Kw)``.
        alpha: per-input-channel weights ``(C,)``, a scalar, or ``None`` for ``alpha = 1``.
        budget: G, an int in ``[1, full_rank]``.
        groups: the conv's ``groups``.

    Returns:
        The factors; ``factors.error`` is the minimal weighted error for that G.

    Raises:
        ValueError: on a budget outside ``[1, full_rank]`` or bad weight/alpha.
    """
    u, s, vh, scores = _scores(weight, alpha, groups)
    n = scores.numel()
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be an int in [1, {n}] (full rank); got {budget!r}")
    if not 1 <= budget <= n:
        raise ValueError(
            f"budget must be in [1, {n}] (full rank = C * min(M/groups, Kh*Kw)); got {budget}"
        )
    flat = scores.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    keep[order[:budget]] = True
    error = flat[~keep].sum().item()
    return _factors_from_keep(weight, groups, u, s, vh, keep.reshape(scores.shape), error)


def lego(
    weight: torch.Tensor,
    alpha: torch.Tensor | float | None,
    beta: float,
    groups: int = 1,
) -> GDWSFactors:
    """LEGO: fewest components (G) whose weighted error is ``<= beta``.

    Drops the smallest scores ``alpha_c * s**2`` in ascending order while their cumulative sum
    stays ``<= beta``. At least one component is always kept (a conv with G = 0 would output
    only its bias); if ``beta`` allows dropping everything the largest score is kept.

    Args:
        weight: conv weight ``(M, C/groups, Kh, Kw)``.
        alpha: per-input-channel weights ``(C,)``, a scalar, or ``None`` for ``alpha = 1``.
        beta: the error bound, finite and ``>= 0``.
        groups: the conv's ``groups``.

    Raises:
        ValueError: on a negative or non-finite ``beta`` or bad weight/alpha.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ValueError(f"beta must be a finite number >= 0; got {beta!r}")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0; got {beta}")
    u, s, vh, scores = _scores(weight, alpha, groups)
    flat = scores.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, descending=False, stable=True)
    csum = torch.cumsum(flat[order], 0)
    n_drop = int((csum <= beta).sum().item())  # csum is non-decreasing
    n_drop = min(n_drop, n - 1)
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    keep[order[:n_drop]] = False
    error = flat[~keep].sum().item()
    return _factors_from_keep(weight, groups, u, s, vh, keep.reshape(scores.shape), error)
