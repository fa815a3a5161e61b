"""Training-time λ samplers: which λ each sample of a batch is trained at."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LambdaSampler:
    """Draws a (N,) tensor of λ for a batch of N samples."""

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-friendly description (logged with a run's config)."""
        return {"sampler": type(self).__name__}


class DiscreteLambdaSampler(LambdaSampler):
    """OAT's sampler: λ uniform per sample over a discrete set, with a fixed share of each
    batch at λ = 0 (default: the share 1/len(lambdas) of uniform sampling, made exact).

    Fixing the λ = 0 count per batch keeps both norm branches in use in every step, which
    DistributedDataParallel needs and which stabilises the clean BN statistics. The other
    samples are spread over the λ > 0 values in equal counts (the remainder going to values
    drawn at random), then the batch is shuffled: each value's expected share is that of
    uniform draws, and the smallest λ group is as large as the batch allows, which methods
    that run one forward per λ group need (``float``, ``floats``, ``smart``: a group of one
    sample cannot be batch-normalised at 1×1).
    """

    def __init__(
        self,
        lambdas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0),
        clean_fraction: float | None = None,
    ) -> None:
        values = sorted(float(v) for v in lambdas)
        if not values or any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"training λ values must be in [0, 1], got {list(lambdas)}")
        self.lambdas = values
        nonzero = [v for v in values if v > 0]
        if clean_fraction is None:
            clean_fraction = 1.0 / len(values) if 0.0 in values else 0.0
        if not 0.0 <= clean_fraction <= 1.0:
            raise ValueError(f"clean_fraction must be in [0, 1], got {clean_fraction}")
        if clean_fraction < 1.0 and not nonzero:
            raise ValueError("clean_fraction < 1 needs at least one λ > 0 in the set")
        self.clean_fraction = clean_fraction
        self._nonzero = torch.tensor(nonzero or [0.0])

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        n_clean = round(self.clean_fraction * batch_size)
        n_rest, k = batch_size - n_clean, len(self._nonzero)
        counts = torch.full((k,), n_rest // k)
        counts[torch.randperm(k, generator=generator)[: n_rest % k]] += 1
        lam = torch.cat([torch.zeros(n_clean), self._nonzero.repeat_interleave(counts)])
        return lam[torch.randperm(batch_size, generator=generator)]

    def describe(self) -> dict:
        return {
            **super().describe(), "lambdas": self.lambdas, "clean_fraction": self.clean_fraction
        }


class ExtremesLambdaSampler(DiscreteLambdaSampler):
    """FLOAT's sampler: half of each batch at λ = 0 (clean), half at λ = 1 (adversarial)."""

    def __init__(self) -> None:
        super().__init__(lambdas=(0.0, 1.0), clean_fraction=0.5)
