"""Shared conditioned building blocks: dual norm, FiLM, λ encodings, expert masks, base
classes."""

from .base import ConditionedModule, ConditionedParametrization, FoldableParametrization
from .dual_norm import DualNorm, carries_activation, channel_dim, is_norm, norm_channels
from .encoding import OrthogonalEncoding, ScalarEncoding, SinusoidalEncoding, build_encoding
from .expert_masks import ExpertMasks
from .film import FiLM

__all__ = [
    "ConditionedModule",
    "ConditionedParametrization",
    "DualNorm",
    "ExpertMasks",
    "FiLM",
    "FoldableParametrization",
    "OrthogonalEncoding",
    "ScalarEncoding",
    "SinusoidalEncoding",
    "build_encoding",
    "carries_activation",
    "channel_dim",
    "is_norm",
    "norm_channels",
]
