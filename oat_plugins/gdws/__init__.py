"""GDWS: post-training generalized depthwise-separable approximation (Dbouk & Shanbhag, 2021).

Public API:
    mego, lego, GDWSFactors      exact per-layer allocation for one conv weight
    GDWSConv2d                   the replacement layer (self-contained torch module)
    compute_alphas               margin-sensitivity channel weights on adversarial samples
    convert, format_report       network-level conversion and its per-layer report
    count_macs                   whole-network MACs for an input shape
    save_converted, load_converted  weights_only-safe storage of a converted model
"""

from .alphas import compute_alphas, default_attack
from .convert import (
    ConvSpec,
    GDWSLayerReport,
    UnsupportedConv,
    conv_spec,
    convert,
    eligible_convs,
    format_report,
)
from .core import GDWSFactors, channel_svd, full_rank, lego, mego
from .io import count_macs, load_converted, save_converted
from .layer import GDWSConv2d

__all__ = [
    "ConvSpec",
    "GDWSConv2d",
    "GDWSFactors",
    "GDWSLayerReport",
    "UnsupportedConv",
    "channel_svd",
    "compute_alphas",
    "conv_spec",
    "convert",
    "count_macs",
    "default_attack",
    "eligible_convs",
    "format_report",
    "full_rank",
    "lego",
    "load_converted",
    "mego",
    "save_converted",
]
