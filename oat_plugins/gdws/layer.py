"""``GDWSConv2d``: a generalized depthwise-separable stand-in for a K x K convolution.

Self-contained on purpose (torch and timm's padding helper only): it lives inside exported plain
models and must not pull in the rest of ``oat_plugins``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from torch import nn

__all__ = ["GDWSConv2d"]


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


class GDWSConv2d(nn.Module):
    """Channel gather + depthwise ``Kh x Kw`` conv (G channels) + ``1 x 1`` conv with the bias.

    Equivalent to the dense conv whose weight is ``sum_i pw_i (x) dw_i`` placed at input channel
    ``channel_index[i]``. Stride, dilation, padding (ints, ``'same'``/``'valid'``, non-zero
    ``padding_mode``) and timm's dynamic TF-"same" padding (``same_pad=True``, via
    :func:`timm.layers.padding.pad_same`) behave as in the original conv.

    Layout:
        * If every input channel keeps the same number q >= 1 of components, no gather is needed:
          the depthwise conv is ``groups=C`` with ``C*q`` outputs (a channel multiplier).
        * Otherwise the G used channels are gathered with ``index_select`` and convolved with
          ``groups=G``.
        * For an original conv with ``groups=g > 1``, components are laid out group by group,
          each group zero-padded to the largest group's count, and the 1 x 1 conv uses
          ``groups=g`` (block-diagonal). Padding components are counted in the MACs.

    Construct with :meth:`from_factors`; the plain constructor builds an uninitialised skeleton of
    the right shapes (used to rebuild a saved converted model, see :meth:`config`).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode:
            as in the original :class:`torch.nn.Conv2d`.
        bias: whether the 1 x 1 conv carries a bias.
        same_pad: apply timm's dynamic TF-"same" padding before the depthwise conv.
        num_components: G as implemented (including group padding).
        gather: whether a ``channel_index`` gather is used (see Layout).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        same_pad: bool = False,
        num_components: int = 1,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError("in_channels and out_channels must be divisible by groups")
        if num_components < 1 or num_components % groups:
            raise ValueError("num_components must be a positive multiple of groups")
        if not gather and num_components % in_channels:
            raise ValueError("without gather, num_components must be a multiple of in_channels")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding: tuple[int, int] | str = padding if isinstance(padding, str) else _pair(
            padding
        )
        self.dilation = _pair(dilation)
        self.groups = int(groups)
        self.padding_mode = padding_mode
        self.same_pad = bool(same_pad)
        self.num_components = int(num_components)
        self.gather = bool(gather)
        kh, kw = self.kernel_size
        self.dw_weight = nn.Parameter(torch.empty(self.num_components, 1, kh, kw))
        self.pw_weight = nn.Parameter(
            torch.empty(self.out_channels, self.num_components // self.groups, 1, 1)
        )
        self.bias = nn.Parameter(torch.empty(self.out_channels)) if bias else None
        if self.gather:
            self.register_buffer(
                "channel_index", torch.zeros(self.num_components, dtype=torch.long)
            )
        else:
            self.register_buffer("channel_index", None)
        self._pad_arg: list[int] | None = None
        if padding_mode != "zeros":
            if isinstance(self.padding, str):
                raise ValueError("string padding with a non-zero padding_mode is not supported")
            ph, pw = self.padding
            self._pad_arg = [pw, pw, ph, ph]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_factors(
        cls,
        factors: Any,
        *,
        bias: torch.Tensor | None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        same_pad: bool = False,
    ) -> GDWSConv2d:
        """Build from :class:`oat_plugins.gdws.core.GDWSFactors` (duck-typed: needs
        ``channel_index``, ``depthwise``, ``pointwise``, ``in_channels``, ``out_channels``,
        ``groups``) and the original conv's bias and geometry."""
        c, m, g = int(factors.in_channels), int(factors.out_channels), int(factors.groups)
        idx = factors.channel_index.detach().to(torch.long)
        dw = factors.depthwise.detach()
        pw = factors.pointwise.detach()
        kh, kw = dw.shape[-2:]
        counts = torch.bincount(idx.cpu(), minlength=c)
        cg, mg = c // g, m // g
        uniform = bool((counts == counts[0]).all()) and int(counts[0]) >= 1
        if uniform:
            n_impl, gather = int(idx.numel()), False
            idx_impl, dw_impl, pw_cols = idx, dw, pw
        else:
            gather = True
            group_of = idx // cg
            per_group = torch.bincount(group_of.cpu(), minlength=g)
            n_max = max(int(per_group.max()), 1)
            n_impl = n_max * g
            idx_impl = torch.empty(n_impl, dtype=torch.long, device=idx.device)
            dw_impl = dw.new_zeros(n_impl, kh, kw)
            pw_cols = pw.new_zeros(n_impl, mg)
            start = 0
            for j in range(g):
                n_j = int(per_group[j])
                sl = slice(j * n_max, j * n_max + n_j)
                idx_impl[j * n_max:(j + 1) * n_max] = j * cg  # padding reads any channel of j
                idx_impl[sl] = idx[start:start + n_j]
                dw_impl[sl] = dw[start:start + n_j]
                pw_cols[sl] = pw[start:start + n_j]
                start += n_j
        layer = cls(
            c, m, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=g,
            bias=bias is not None, padding_mode=padding_mode, same_pad=same_pad,
            num_components=n_impl, gather=gather,
        ).to(device=dw.device, dtype=dw.dtype)
        with torch.no_grad():
            layer.dw_weight.copy_(dw_impl.reshape(n_impl, 1, kh, kw))
            # pointwise: output channel o of group j reads the group's components
            per = n_impl // g
            pwm = pw_cols.reshape(g, per, mg).permute(0, 2, 1).reshape(m, per, 1, 1)
            layer.pw_weight.copy_(pwm)
            if bias is not None:
                layer.bias.copy_(bias.detach())
            if gather:
                layer.channel_index.copy_(idx_impl)
        return layer

    def config(self) -> dict[str, Any]:
        """Plain-Python constructor arguments (``GDWSConv2d(**cfg)`` rebuilds the skeleton)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "padding_mode": self.padding_mode,
            "same_pad": self.same_pad,
            "num_components": self.num_components,
            "gather": self.gather,
        }

    # ------------------------------------------------------------------ cost
    @property
    def macs_per_pixel(self) -> int:
        """MACs per output pixel of this layer: ``G*(Kh*Kw) + G*M/groups`` (= ``G*(K^2+M)`` for
        ``groups=1``), G as implemented."""
        kh, kw = self.kernel_size
        g = self.num_components
        return g * kh * kw + g * self.out_channels // self.groups

    @property
    def original_macs_per_pixel(self) -> int:
        """MACs per output pixel of the dense conv it replaces: ``C*Kh*Kw*M/groups``."""
        kh, kw = self.kernel_size
        return self.in_channels * kh * kw * self.out_channels // self.groups

    # ------------------------------------------------------------------ forward
    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``(M, C/groups, Kh, Kw)`` (for checks)."""
        kh, kw = self.kernel_size
        m, g, c = self.out_channels, self.groups, self.in_channels
        per = self.num_components // g
        mg, cg = m // g, c // g
        idx = (
            self.channel_index
            if self.channel_index is not None
            else torch.arange(c, device=self.dw_weight.device).repeat_interleave(
                self.num_components // c
            )
        )
        pw = self.pw_weight.reshape(g, mg, per).permute(0, 2, 1).reshape(-1, mg)
        contrib = pw.unsqueeze(2) * self.dw_weight.reshape(-1, 1, kh * kw)
        per_ch = contrib.new_zeros(c, mg, kh * kw).index_add_(0, idx, contrib)
        w = per_ch.reshape(g, cg, mg, kh * kw).permute(0, 2, 1, 3).reshape(m, cg, kh, kw)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding: tuple[int, int] | str = self.padding
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        elif self._pad_arg is not None:
            x = F.pad(x, self._pad_arg, mode=self.padding_mode)
            padding = 0  # type: ignore[assignment]
        if self.channel_index is not None:
            x = x.index_select(1, self.channel_index)
            dw_groups = self.num_components
        else:
            dw_groups = self.in_channels
        x = F.conv2d(x, self.dw_weight, None, self.stride, padding, self.dilation, dw_groups)
        return F.conv2d(x, self.pw_weight, self.bias, 1, 0, 1, self.groups)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
            f"G={self.num_components}, stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.same_pad:
            s += ", same_pad=True"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if not self.gather:
            s += ", gather=False"
        if self.bias is None:
            s += ", bias=False"
        return s
