"""Encodings of λ fed to FiLM generators. None has parameters, so outputs can be cached."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class ScalarEncoding(nn.Module):
    """e(λ) = [λ]: one feature, any λ in [0, 1]."""

    dim = 1

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        return lam[:, None]


class SinusoidalEncoding(nn.Module):
    """e(λ) = [sin(2^k·π·λ), cos(2^k·π·λ)] for k < dim/2: smooth, any λ in [0, 1]."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"sinusoidal encoding dim must be an even number >= 2, got {dim}")
        self.dim = dim
        freqs = math.pi * 2.0 ** torch.arange(dim // 2, dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        angles = lam[:, None] * self.freqs.to(lam)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class OrthogonalEncoding(nn.Module):
    """OAT's encoding: one random orthonormal code per trained λ (a buffer in the checkpoint).

    The reference accepts only the trained λ values at test time; here a λ between two trained
    values gets the linear interpolation of their codes, so every λ in [0, 1] is usable.
    """

    def __init__(self, lambdas: Sequence[float], dim: int = 128, seed: int = 0) -> None:
        super().__init__()
        values = sorted(float(v) for v in lambdas)
        if len(values) < 2 or values[0] != 0.0 or values[-1] != 1.0:
            raise ValueError(
                "orthogonal encoding needs at least two trained λ values including 0 and 1 "
                f"(so that all of [0, 1] is covered), got {list(lambdas)}"
            )
        if len(set(values)) != len(values):
            raise ValueError(f"orthogonal encoding λ values must be distinct, got {values}")
        if dim < len(values):
            raise ValueError(
                f"orthogonal encoding dim ({dim}) must be >= the number of λ values "
                f"({len(values)}) for the codes to be orthogonal"
            )
        self.dim = dim
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, len(values), generator=generator))
        self.register_buffer("lambdas", torch.tensor(values))
        self.register_buffer("codes", q.T.contiguous())

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        values = self.lambdas.to(lam)
        codes = self.codes.to(lam)
        upper = torch.searchsorted(values, lam.contiguous(), right=True).clamp(1, len(values) - 1)
        lower = upper - 1
        t = ((lam - values[lower]) / (values[upper] - values[lower])).clamp(0, 1)[:, None]
        return (1 - t) * codes[lower] + t * codes[upper]


def build_encoding(
    kind: str, *, dim: int, lambdas: Sequence[float], seed: int
) -> nn.Module:
    """Create the λ encoding named ``kind`` ('orthogonal', 'sinusoidal' or 'scalar')."""
    if kind == "orthogonal":
        return OrthogonalEncoding(lambdas, dim=dim, seed=seed)
    if kind == "sinusoidal":
        return SinusoidalEncoding(dim)
    if kind == "scalar":
        return ScalarEncoding()
    raise ValueError(
        f"unknown λ encoding {kind!r}; choose one of 'orthogonal', 'sinusoidal', 'scalar'"
    )
