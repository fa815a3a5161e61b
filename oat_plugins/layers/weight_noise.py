"""FLOAT's conditioned weight: W_eff = W + α·λ·η, as a ``torch.nn.utils.parametrize``
parametrization (the module keeps its own class and forward, e.g. timm's Conv2dSame)."""

from __future__ import annotations

import torch
from torch import nn

from ..condition import Condition
from .base import ConditionedParametrization, FoldCache

NOISE_MODES = ("fixed", "resample")


def seeded_noise(
    weight: torch.Tensor, seed: int, std: float | torch.Tensor | None = None
) -> torch.Tensor:
    """η ~ N(0, std²) shaped like ``weight`` (std defaults to std(W)), drawn on the CPU from a
    generator seeded with ``seed``: reproducible on any device and independent of the global
    RNG."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    z = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    if std is None:
        std = weight.detach().float().std(correction=0).cpu()
    return (z * std).to(device=weight.device, dtype=weight.dtype)


class _AddScaledNoise(torch.autograd.Function):
    """W + λ·α·η in one fused kernel (``addcmul``) whose backward gives α its gradient as a
    dot product, λ·⟨g, η⟩ (per output channel for a per-channel α).

    Why not autograd's own: ``W + (α·λ)·η`` writes two weight-sized temporaries forward and
    ``g·η`` backward, per conditioned layer and step; on a ResNet-18 these elementwise passes
    over 11 M weights cost as much as a sixth of a CIFAR training step on a CPU (and three
    extra kernel launches per layer on a GPU). The backward is made of differentiable ops, so
    double backward still works."""

    @staticmethod
    def forward(weight: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                lam: float) -> torch.Tensor:
        return torch.addcmul(weight, noise, alpha, value=lam)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (autograd's signature)
        _, noise, alpha, lam = inputs
        ctx.save_for_backward(noise)
        ctx.lam, ctx.alpha_shape = lam, alpha.shape

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (noise,) = ctx.saved_tensors
        grad_alpha = None
        if ctx.needs_input_grad[2]:
            if len(ctx.alpha_shape) == 0:
                grad_alpha = torch.dot(grad.reshape(-1), noise.reshape(-1)) * ctx.lam
            else:  # one α per output channel
                grad_alpha = (torch.linalg.vecdot(grad.flatten(1), noise.flatten(1))
                              * ctx.lam).view(ctx.alpha_shape)
        return grad if ctx.needs_input_grad[0] else None, None, grad_alpha, None


def add_scaled_noise(weight: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                     lam: float) -> torch.Tensor:
    """``weight + lam·alpha·noise`` (α a scalar or per-output-channel tensor), with the fused
    forward and dot-product backward of :class:`_AddScaledNoise`."""
    return _AddScaledNoise.apply(weight, noise, alpha, float(lam))


class WeightNoise(ConditionedParametrization):
    """W ↦ W + α·λ·η at the condition's scalar λ (λ = 0 returns W itself).

    ``noise='fixed'``: η is drawn once (``seed``) and kept as a persistent buffer, so the
    forward is deterministic and the weight folds into a plain one at any λ.
    ``noise='resample'``: η ~ N(0, std(W)²) is redrawn from the global RNG at every forward
    (the authors' code); the model is then random at λ > 0 (evaluate with EOT attacks) and
    cannot be exported.

    α is a learnable scalar (``alpha_per_channel=False``) or one value per output channel,
    initialised at ``alpha_init``.

    The parametrization needs a scalar λ: a weight cannot differ per sample inside one
    batched forward. :class:`~oat_plugins.ConditionalModel` serves a per-sample λ by running
    one forward per distinct λ value (``Method.lambda_groups``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        condition: Condition,
        *,
        noise: str = "fixed",
        alpha_init: float = 0.25,
        alpha_per_channel: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(condition)
        if noise not in NOISE_MODES:
            raise ValueError(f"unknown noise mode {noise!r}; choose one of {list(NOISE_MODES)}")
        self.mode = noise
        self.deterministic = noise == "fixed"
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if alpha_per_channel else ()
        self.alpha = nn.Parameter(
            torch.full(shape, float(alpha_init), dtype=weight.dtype, device=weight.device)
        )
        noise_buffer = seeded_noise(weight, seed) if noise == "fixed" else None
        self.register_buffer("noise", noise_buffer, persistent=True)
        self._folded: FoldCache[torch.Tensor] = FoldCache()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.condition.is_scalar:
            raise RuntimeError(
                "WeightNoise needs one scalar λ per forward (a weight cannot differ per sample "
                "within a batch); ConditionalModel runs one forward per λ group for this"
            )
        lam = self.condition.lam
        if lam == 0:
            return weight
        if self.noise is None:  # resampled: a fresh draw every forward, never cached
            std = weight.detach().std(correction=0)
            return add_scaled_noise(weight, torch.randn_like(weight) * std, self.alpha, lam)
        if self.condition.weights_constant:  # no gradient wanted: fold once per λ
            return self._folded.get(lam, (weight, self.alpha, self.noise),
                                    lambda: add_scaled_noise(weight, self.noise, self.alpha, lam))
        return add_scaled_noise(weight, self.noise, self.alpha, lam)

    def extra_repr(self) -> str:
        return f"noise={self.mode!r}, alpha_shape={tuple(self.alpha.shape)}"
