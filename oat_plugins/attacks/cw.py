"""CW∞: L∞ PGD on the Carlini–Wagner margin loss (registered as ``'cw'``)."""

from __future__ import annotations

import math

import torch
import torchattacks
from torch import nn

__all__ = ["CWLinf"]


class CWLinf(torchattacks.PGD):
    """L∞ PGD on the Carlini–Wagner margin loss (the "CW∞" of the adversarial-training
    literature): maximise ``max_{j≠y} z_j − z_y`` inside the ε-ball. torchattacks' own ``CW``
    is an unbounded L2 attack, whose success rate is not a robust accuracy at ε."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 20, random_start: bool = True) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        self.attack = "CWLinf"
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            logits = self.get_logits(adv)
            true = logits.gather(1, labels[:, None]).squeeze(1)
            other = logits.masked_fill(
                nn.functional.one_hot(labels, logits.shape[1]).bool(), -math.inf
            ).amax(1)
            grad = torch.autograd.grad((other - true).sum(), adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv
