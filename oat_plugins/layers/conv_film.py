"""FiLM on a convolution's output: the FiLM site of a network without norm layers.

Norm-free networks (timm's NF-ResNet / NF-RegNet / NFNet, VGG without BN) have no norm to put
FiLM after, so FiLM goes right after the convolutions. Folding at a fixed λ scales the conv's
per-output-channel scale parameter by γ and maps its bias b to b·γ + β: the exported conv keeps
its class and parameter count.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import ConditionedModule
from .film import FiLM

SCALE_CANDIDATES = ("weight", "gain")
"""Parameters that may scale a conv's output linearly per channel: ``weight`` for plain convs
(and padding subclasses such as Conv2dSame), ``gain`` for scaled weight-standardised convs
(timm's ScaledStdConv2d), whose output does not change when ``weight`` is scaled."""


def output_scale_parameter(conv: nn.Module) -> str | None:
    """The name of a parameter of ``conv`` that scales its output linearly per output channel,
    or None (not an ``nn.Conv2d`` with a bias, or no such parameter: e.g. StdConv2d).

    Found by probing, not by class: on a copy with random parameters (a zero-initialised
    weight, as in NF-ResNet's last conv of a block, would make any candidate pass),
    multiplying the candidate by c (one factor per output channel) must multiply the output
    minus the bias by c.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(conv.bias, nn.Parameter) \
            or conv.weight.is_meta:
        return None
    g = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(conv)
    with torch.no_grad():
        for param in probe.parameters():
            param.copy_(1 + torch.rand(param.shape, generator=g))
    span = [d * (k - 1) + s for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride,
                                               strict=True)]
    x = torch.randn(1, conv.in_channels, *span, generator=g).to(conv.weight)
    c = (1 + torch.rand(conv.out_channels, generator=g)).to(conv.weight).view(1, -1, 1, 1)
    return next((name for name in SCALE_CANDIDATES if _scales_output(probe, name, x, c)), None)


@torch.no_grad()
def _scales_output(conv: nn.Conv2d, name: str, x: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether multiplying ``conv.<name>`` by ``c`` per output channel multiplies
    ``conv(x) - bias`` by ``c``."""
    param = getattr(conv, name, None)
    if not isinstance(param, nn.Parameter) or param.dim() == 0 \
            or param.shape[0] != conv.out_channels:
        return False
    bias = conv.bias.view(1, -1, 1, 1)
    base = conv(x) - bias
    param.mul_(c.view(-1, *[1] * (param.dim() - 1)))
    scaled = conv(x) - bias
    param.div_(c.view(-1, *[1] * (param.dim() - 1)))
    return torch.allclose(scaled, base * c, rtol=1e-3, atol=1e-5)


class ConvFiLM(ConditionedModule):
    """``film(conv(x))``: a FiLM on the output channels of a conv with a bias.

    ``scale`` names the conv parameter that scales its output per channel (see
    :func:`output_scale_parameter`); :meth:`fold` multiplies it by γ.
    """

    def __init__(self, conv: nn.Conv2d, film: FiLM, scale: str) -> None:
        super().__init__(film.condition)
        self.conv = conv
        self.film = film
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.film(self.conv(x))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """The conv (its own class) with the FiLM at the current scalar λ folded in:
        (W∗x + b)·γ + β = (γ·W)∗x + (b·γ + β), with γ applied to the scale parameter."""
        if not self.condition.is_scalar:
            raise ValueError("fold needs a scalar λ")
        conv = copy.deepcopy(self.conv)
        scale = getattr(conv, self.scale)
        probe = torch.empty(1, device=scale.device, dtype=scale.dtype)
        gamma, beta = (t[0] for t in self.film.affine(probe))
        scale.mul_(gamma.view(-1, *[1] * (scale.dim() - 1)))
        conv.bias.copy_(conv.bias * gamma + beta)
        return conv

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"
