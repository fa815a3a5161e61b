"""FiLM: a feature-wise affine y = x·γ(e) + β(e) generated from the λ encoding e."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..condition import Condition
from .base import ConditionedModule, FoldCache


class FiLM(ConditionedModule):
    """OAT's FiLM generator ``Linear(D→2C) → LeakyReLU → Linear(2C→2C)`` applied per channel.

    ``identity_init=True`` parametrises γ = 1 + Δγ with the last layer zero-initialised, so a
    freshly wrapped (e.g. pretrained) backbone is unchanged. ``identity_init=False`` is the
    reference form, γ = leaky_relu(·), β = leaky_relu(·), with default initialisation.
    """

    def __init__(
        self,
        channels: int,
        channel_dim: int,
        encoder: nn.Module,
        condition: Condition,
        identity_init: bool = True,
    ) -> None:
        super().__init__(condition)
        self.channels = channels
        self.channel_dim = channel_dim
        self.identity_init = identity_init
        # Shared by every FiLM of the model and owned by its ``extras``: a plain attribute,
        # not a submodule, so its buffers are saved once (deepcopy keeps the sharing).
        object.__setattr__(self, "encoder", encoder)
        self.net = nn.Sequential(
            nn.Linear(encoder.dim, 2 * channels),
            nn.LeakyReLU(),
            nn.Linear(2 * channels, 2 * channels),
        )
        if identity_init:
            nn.init.zeros_(self.net[2].weight)
            nn.init.zeros_(self.net[2].bias)
        self._folded: FoldCache[tuple[torch.Tensor, torch.Tensor]] = FoldCache()

    def affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β), each (B, C), for the current λ (B = 1 for a scalar λ)."""
        # The λ code is computed once per λ (float32) and shared by every FiLM of the model.
        code = self.condition.cached(("film-encoding", id(self.encoder)), x, self.encoder)
        if self.condition.weights_constant:
            # e.g. inside an attack at a per-sample λ: γ, β once per λ, not every forward (the
            # code is a new tensor whenever λ or the batch size changes)
            return self._folded.get(None, (code,), lambda: self._affine(code), module=self.net)
        return self._affine(code)

    def _affine(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gamma, beta = self.net(code.to(self.net[0].weight.dtype)).chunk(2, dim=1)
        if self.identity_init:
            return 1 + gamma, beta
        return F.leaky_relu(gamma), F.leaky_relu(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(x)
        shape = [gamma.shape[0]] + [1] * (x.dim() - 1)
        shape[self.channel_dim] = self.channels
        # one fused pass over the activations (x·γ + β as two ops writes a temporary)
        return torch.addcmul(beta.reshape(shape), x, gamma.reshape(shape))

    @torch.no_grad()
    def fold_into(self, norm: nn.Module) -> None:
        """Fold this FiLM at the current scalar λ into ``norm``'s per-channel affine:
        (n·w + b)·γ + β = n·(w·γ) + (b·γ + β)."""
        probe = torch.empty(1, device=self.net[0].weight.device, dtype=self.net[0].weight.dtype)
        gamma, beta = (t[0] for t in self.affine(probe))
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if weight is None or bias is None or weight.shape != gamma.shape:
            raise ValueError(
                f"cannot fold FiLM into {type(norm).__name__}: it needs a per-channel affine "
                f"weight and bias of shape ({self.channels},)"
            )
        bias.copy_(bias * gamma + beta)
        weight.mul_(gamma)

