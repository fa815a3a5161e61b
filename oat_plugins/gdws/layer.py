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


def _check_layout(c: int, m: int, groups: int, n: int, layout: str) -> None:
    if c % groups or m % groups:
        raise ValueError("in_channels and out_channels must be divisible by groups")
    if n < 1 or n % groups:
        raise ValueError("num_components must be a positive multiple of groups")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    if layout != "gather" and n % c:
        raise ValueError(f"layout {layout!r} needs num_components to be a multiple of in_channels")
    if layout == "replicate" and groups != 1:
        raise ValueError("layout 'replicate' needs groups == 1")


def _replicate_slots(
    factors: Any, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Slot-major factors (component k of channel c at ``k*C + c``), channels with fewer than
    ``q = max g_c`` components padded with zero kernels/columns. Returns ``(dw, pw, None)``."""
    c = int(factors.in_channels)
    idx = factors.channel_index.detach().to(torch.long)
    dw, pw = factors.depthwise.detach(), factors.pointwise.detach()
    q = max(int(counts.max()), 1)
    # rank of each component within its channel (components of a channel are contiguous)
    first = torch.cumsum(counts, 0).to(idx.device) - counts.to(idx.device)
    slot = torch.arange(idx.numel(), device=idx.device) - first[idx]
    pos = slot * c + idx
    dw_impl = dw.new_zeros(q * c, *dw.shape[-2:])
    pw_cols = pw.new_zeros(q * c, pw.shape[1])
    dw_impl[pos] = dw
    pw_cols[pos] = pw
    return dw_impl, pw_cols, None


def _gather_slots(factors: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel-major factors with a gather index, each group zero-padded to the largest group's
    count (padding reads any channel of its group). Returns ``(dw, pw, channel_index)``."""
    c, g = int(factors.in_channels), int(factors.groups)
    idx = factors.channel_index.detach().to(torch.long)
    dw, pw = factors.depthwise.detach(), factors.pointwise.detach()
    cg = c // g
    per_group = torch.bincount((idx // cg).cpu(), minlength=g)
    n_max = max(int(per_group.max()), 1)
    idx_impl = torch.empty(n_max * g, dtype=torch.long, device=idx.device)
    dw_impl = dw.new_zeros(n_max * g, *dw.shape[-2:])
    pw_cols = pw.new_zeros(n_max * g, pw.shape[1])
    start = 0
    for j in range(g):
        n_j = int(per_group[j])
        sl = slice(j * n_max, j * n_max + n_j)
        idx_impl[j * n_max:(j + 1) * n_max] = j * cg
        idx_impl[sl] = idx[start:start + n_j]
        dw_impl[sl] = dw[start:start + n_j]
        pw_cols[sl] = pw[start:start + n_j]
        start += n_j
    return dw_impl, pw_cols, idx_impl


LAYOUTS = ("replicate", "gather", "multiplier")


class GDWSConv2d(nn.Module):
    """Depthwise ``Kh x Kw`` conv with G channels + ``1 x 1`` conv with the bias.

    Equivalent to the dense conv whose weight is ``sum_i pw_i (x) dw_i`` placed at input channel
    ``channel_index[i]``. Stride, dilation, padding (ints, ``'same'``/``'valid'``, non-zero
    ``padding_mode``) and timm's dynamic TF-"same" padding (``same_pad=True``, via
    :func:`timm.layers.padding.pad_same`) behave as in the original conv. Works in either memory
    format: a ``channels_last`` input and weights (``model.to(memory_format=torch.channels_last)``)
    stay ``channels_last`` throughout; nothing is made contiguous in NCHW.

    Layouts (``layout``), all ending in one depthwise conv with ``groups=G`` (channel multiplier
    1, the fast oneDNN/ATen depthwise kernel) and one ``1 x 1`` conv:
        * ``"replicate"`` (``groups=1``; every input channel keeps the same number q of
          components, padded with zero components if needed): components are stored slot-major,
          component k of channel c at ``k*C + c``, so the depthwise input is q copies of the
          input concatenated along channels (``torch.cat``, no index; skipped for q = 1). A cat
          copy is cheap in both memory formats, unlike an interleaved copy in channels_last.
        * ``"gather"``: the G used channels are gathered with ``index_select`` (channel-major,
          ``channel_index``). For an original conv with ``groups=g > 1``, components are laid out
          group by group, each group zero-padded to the largest group's count, and the
          ``1 x 1`` conv uses ``groups=g`` (block-diagonal). Padding components count in the MACs.
        * ``"multiplier"``: legacy layout of files saved before ``"replicate"`` existed
          (depthwise with a channel multiplier q, channel-major). Same numbers, but PyTorch's CPU
          depthwise kernel with a multiplier > 1 is 10-40x slower per MAC; re-convert to
          get ``"replicate"``.

    Construct with :meth:`from_factors`; the plain constructor builds an uninitialised skeleton of
    the right shapes (used to rebuild a saved converted model, see :meth:`config`).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode:
            as in the original :class:`torch.nn.Conv2d`.
        bias: whether the 1 x 1 conv carries a bias.
        same_pad: apply timm's dynamic TF-"same" padding before the depthwise conv.
        num_components: G as implemented (including padding components).
        gather: legacy switch, used only when ``layout`` is None: True means ``"gather"``,
            False ``"multiplier"`` (what files written before ``layout`` existed mean).
        layout: ``"replicate"``, ``"gather"`` or ``"multiplier"`` (see above).
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
        layout: str | None = None,
    ) -> None:
        super().__init__()
        layout = layout if layout is not None else ("gather" if gather else "multiplier")
        _check_layout(in_channels, out_channels, groups, num_components, layout)
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
        self.layout = layout
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

    @property
    def gather(self) -> bool:
        """Whether the layer gathers input channels with ``channel_index``."""
        return self.layout == "gather"

    @property
    def replicas(self) -> int:
        """q, the components per input channel of the ``replicate``/``multiplier`` layouts."""
        return self.num_components // self.in_channels

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
        layout: str = "auto",
    ) -> GDWSConv2d:
        """Build from :class:`oat_plugins.gdws.core.GDWSFactors` (duck-typed: needs
        ``channel_index``, ``depthwise``, ``pointwise``, ``in_channels``, ``out_channels``,
        ``groups``) and the original conv's bias and geometry.

        ``layout``: ``"auto"`` (``"replicate"`` when ``groups == 1`` and every input channel
        keeps the same number of components, else ``"gather"``), ``"gather"``, or
        ``"replicate"`` (``groups == 1`` only; channels with fewer than ``max g_c`` components
        are padded with zero components, which count in the MACs).
        """
        c, g = int(factors.in_channels), int(factors.groups)
        counts = torch.bincount(factors.channel_index.detach().cpu(), minlength=c)
        uniform = bool((counts == counts[0]).all()) and int(counts[0]) >= 1
        if layout == "auto":
            layout = "replicate" if uniform and g == 1 else "gather"
        if layout not in ("replicate", "gather"):
            raise ValueError(f"layout must be 'auto', 'replicate' or 'gather'; got {layout!r}")
        if layout == "replicate" and g != 1:
            raise ValueError("layout='replicate' needs groups == 1; use 'gather' or 'auto'")
        if layout == "replicate":
            dw_impl, pw_cols, idx_impl = _replicate_slots(factors, counts)
        else:
            dw_impl, pw_cols, idx_impl = _gather_slots(factors)
        n_impl, (kh, kw) = dw_impl.shape[0], dw_impl.shape[-2:]
        layer = cls(
            c, int(factors.out_channels), (kh, kw), stride=stride, padding=padding,
            dilation=dilation, groups=g, bias=bias is not None, padding_mode=padding_mode,
            same_pad=same_pad, num_components=n_impl, layout=layout,
        ).to(device=dw_impl.device, dtype=dw_impl.dtype)
        with torch.no_grad():
            layer.dw_weight.copy_(dw_impl.reshape(n_impl, 1, kh, kw))
            # pointwise: output channel o of group j reads the group's components
            per, m = n_impl // g, layer.out_channels
            pwm = pw_cols.reshape(g, per, m // g).permute(0, 2, 1).reshape(m, per, 1, 1)
            layer.pw_weight.copy_(pwm)
            if bias is not None:
                layer.bias.copy_(bias.detach())
            if idx_impl is not None:
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
            "layout": self.layout,
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
    def component_channels(self) -> torch.Tensor:
        """``(G,)`` long: the input channel each depthwise channel reads, in layer order."""
        if self.channel_index is not None:
            return self.channel_index
        ar = torch.arange(self.in_channels, device=self.dw_weight.device)
        if self.layout == "replicate":
            return ar.repeat(self.replicas)
        return ar.repeat_interleave(self.replicas)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``(M, C/groups, Kh, Kw)`` (for checks)."""
        kh, kw = self.kernel_size
        m, g, c = self.out_channels, self.groups, self.in_channels
        per = self.num_components // g
        mg, cg = m // g, c // g
        pw = self.pw_weight.reshape(g, mg, per).permute(0, 2, 1).reshape(-1, mg)
        contrib = pw.unsqueeze(2) * self.dw_weight.reshape(-1, 1, kh * kw)
        per_ch = contrib.new_zeros(c, mg, kh * kw).index_add_(
            0, self.component_channels(), contrib
        )
        w = per_ch.reshape(g, cg, mg, kh * kw).permute(0, 2, 1, 3).reshape(m, cg, kh, kw)
        return w

    def _depthwise_input(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The depthwise conv's input and groups for this layout."""
        if self.layout == "gather":
            return x.index_select(1, self.channel_index), self.num_components
        if self.layout == "replicate":
            q = self.replicas
            # cat keeps the input's memory format and copies whole pixels/planes
            return (torch.cat([x] * q, 1) if q > 1 else x), self.num_components
        return x, self.in_channels  # legacy channel multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding: tuple[int, int] | str = self.padding
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        elif self._pad_arg is not None:
            x = F.pad(x, self._pad_arg, mode=self.padding_mode)
            padding = 0  # type: ignore[assignment]
        x, dw_groups = self._depthwise_input(x)
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
        if self.layout != "gather":
            s += f", layout={self.layout}"
        if self.bias is None:
            s += ", bias=False"
        return s
