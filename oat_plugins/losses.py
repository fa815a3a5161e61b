"""What a training step hands a method's loss hook, and OAT's loss (the default hook).

``train.fit`` makes the adversarial examples and calls ``model.method.training_loss(ctx)``
with a :class:`LossContext`; a method that needs more than one logit tensor (e.g. per-exit
logits) returns them from its ``forward`` hook and reads them in its own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import ConditionalModel

Stats = dict[str, float]


class LossForward(nn.Module):
    """The training forward of a :class:`~oat_plugins.ConditionalModel`:
    ``forward(inputs, lam)`` runs the model with each input at its λ and returns the method's
    training outputs (``Method.training_forward``: logits for film/float). Distributed
    training wraps this module, so everything that makes gradients runs inside the
    DistributedDataParallel forward."""

    def __init__(self, model: ConditionalModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, lam: torch.Tensor) -> Any:
        with self.model.at(uniform_value(lam)):
            return self.model.training_outputs(inputs)


def uniform_value(lam: torch.Tensor) -> float | torch.Tensor:
    """A per-sample λ whose samples all share one value (a batch trained or attacked at one
    λ, e.g. fine-tuning at λ = 1) as that scalar: the model then computes its conditioned
    pieces once for the batch (film: FiLM's γ, β; folded norms in an attack), not once per
    sample. The same function and gradients; any other λ is returned as it is."""
    low, high = torch.stack(torch.aminmax(lam.detach())).tolist()
    return float(low) if low == high else lam


@dataclass
class LossContext:
    """One training batch as a method's loss sees it.

    Attributes:
        model: the conditional model being trained.
        x, y: the batch (images in [0, 1], class indices), N samples.
        lam: (N,) per-sample λ drawn by the sampler.
        x_adv: adversarial examples of the samples with ``lam > 0``, in the order of
            ``x[lam > 0]`` (each made at its own λ, model in eval mode).
        forward: ``forward(inputs, lam) -> outputs``: the (possibly DDP-wrapped)
            :class:`LossForward`; call it once per step so DDP sees one forward.
        autocast: returns the mixed-precision context to run ``forward`` in.
    """

    model: ConditionalModel
    x: torch.Tensor
    y: torch.Tensor
    lam: torch.Tensor
    x_adv: torch.Tensor
    forward: Callable[[torch.Tensor, torch.Tensor], Any]
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @property
    def adversarial(self) -> torch.Tensor:
        """Boolean (N,) mask of the samples with an adversarial term (λ > 0)."""
        return self.lam > 0


def oat_loss_terms(ctx: LossContext) -> tuple[torch.Tensor, Stats]:
    """OAT's loss: ``Σ_i [(1 − λ_i)·CE(f_λi(x_i)) + λ_i·CE(f_λi(x_adv_i))] / N``.

    One forward on ``[x of the λ < 1 samples ; x_adv]`` with matching per-sample λ: a clean
    term of weight 0 (λ = 1) is left out, so the robust branch's batch statistics see only
    what the loss uses. Returns the loss and the batch's statistics."""
    lam, adv = ctx.lam, ctx.adversarial
    clean = lam < 1
    inputs = torch.cat([ctx.x[clean], ctx.x_adv])
    targets = torch.cat([ctx.y[clean], ctx.y[adv]])
    weights = torch.cat([1.0 - lam[clean], lam[adv]])
    with ctx.autocast():
        logits = ctx.forward(inputs, torch.cat([lam[clean], lam[adv]]))
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = (weights * losses).sum() / ctx.x.shape[0]
    return loss, batch_stats(ctx, logits, targets, n_clean=int(clean.sum()))


@torch.no_grad()
def batch_stats(ctx: LossContext, logits: torch.Tensor, targets: torch.Tensor,
                n_clean: int) -> Stats:
    """The per-step statistics ``fit`` sums per epoch, for logits laid out as
    ``[clean rows ; adversarial rows]``."""
    correct = logits.argmax(1) == targets
    return {
        "steps": 1.0, "n": float(ctx.x.shape[0]), "n_clean": float(n_clean),
        "n_adv": float(ctx.x_adv.shape[0]),
        "clean_correct": float(correct[:n_clean].sum()),
        "adv_correct": float(correct[n_clean:].sum()),
    }
