"""``multiexit``: RDI-Nets, robust multi-exit input-adaptive inference (Hu et al., ICLR 2020,
"Triple Wins"), with no conditioning on λ.

The exits themselves (heads, early-stopping forward, router, calibration, cost) are a
model-level component in :mod:`oat_plugins.exits`, which any method can have
(``wrap(backbone, "float", exits="auto")``); this method is the one that conditions nothing
and has exits by default. Its loss on each exit is RDI-Nets' 0.5·CE(clean) + 0.5·CE(adversarial),
summed over the exits with their weights by the model. See ``docs/methods/multiexit.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..condition import Condition
from ..losses import LossContext, Stats
from ..samplers import DiscreteLambdaSampler, LambdaSampler
from ..surgery import Replacement
from .base import Method, register_method
from .float import reference_loss_terms


@dataclass
class MultiExitOptions:
    """No options: where the exits go and their loss weights are ``wrap``'s ``exits`` and
    ``exit_weights`` arguments (``exits='auto'`` by default for this method)."""


@register_method
class MultiExit(Method):
    """RDI-Nets: early exits on a backbone that is not conditioned on λ (λ changes nothing;
    training attacks every sample)."""

    name = "multiexit"
    Options = MultiExitOptions
    identity_at_zero = True  # uncalibrated thresholds take no early exit
    default_exits = "auto"

    def apply(self, backbone: nn.Module, condition: Condition, extras: nn.ModuleDict
              ) -> list[Replacement]:
        return []

    def training_loss(self, ctx: LossContext) -> tuple[torch.Tensor, Stats]:
        """RDI-Nets' loss on one exit: ``Σ_i [0.5·CE(f(x_i)) + 0.5·CE(f(x_adv_i))] / N`` (every
        sample has an adversarial example under the default sampler; with no conditioning,
        FLOAT's reference loss computes exactly this)."""
        return reference_loss_terms(ctx)

    def default_sampler(self) -> LambdaSampler:
        """Every sample at λ = 1: every sample gets an adversarial example."""
        return DiscreteLambdaSampler(lambdas=(1.0,), clean_fraction=0.0)
