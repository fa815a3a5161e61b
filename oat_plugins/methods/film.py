"""``film``: OAT's FiLM + dual norm (Wang et al., NeurIPS 2020, "Once-for-All Adversarial
Training")."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..condition import Condition
from ..layers import DualNorm, FiLM, build_encoding, channel_dim, is_norm, norm_channels
from ..layers.conv_film import ConvFiLM, output_scale_parameter
from ..samplers import DiscreteLambdaSampler, LambdaSampler
from ..surgery import NothingToConditionError, Replacement, replace_modules
from .base import Method, check_choice, register_method

_DEFAULT_DIMS = {"orthogonal": 128, "sinusoidal": 16, "scalar": 1}


@dataclass
class FilmOptions:
    """Options of the ``film`` method.

    encoding: how λ is fed to the FiLM generators: ``'orthogonal'`` (OAT's random orthogonal
        codes for the training λ set, interpolated in between), ``'sinusoidal'`` or ``'scalar'``.
    encoding_dim: size of the encoding (default 128 orthogonal, 16 sinusoidal, 1 scalar).
    lambdas: the training λ set (orthogonal codes and the default sampler); must hold 0 and 1.
    identity_init: start FiLM at identity (γ = 1 + Δγ, β = 0), so a wrapped pretrained backbone
        is unchanged; False gives the reference parametrisation (leaky_relu on γ and β).
    film_skip: regex on qualified module names; matching norms (shortcut-path norms, as in OAT)
        get the dual norm but no FiLM.
    seed: seed of the orthogonal codes.
    """

    encoding: str = "orthogonal"
    encoding_dim: int | None = None
    lambdas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 1.0)
    identity_init: bool = True
    film_skip: str = r"(^|\.)(downsample|shortcut)(\.|$)"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.encoding, sorted(_DEFAULT_DIMS), "encoding")
        if self.encoding_dim is None:
            self.encoding_dim = _DEFAULT_DIMS[self.encoding]
        self.lambdas = tuple(float(v) for v in self.lambdas)
        re.compile(self.film_skip)


@register_method
class Film(Method):
    """Every norm becomes a :class:`~oat_plugins.layers.DualNorm`; main-path norms are
    followed by a :class:`~oat_plugins.layers.FiLM` before their activation / residual add.
    Parameters grow by the FiLM generators (about +50–70 % on ResNets, as in the paper)."""

    name = "film"
    Options = FilmOptions

    @property
    def identity_at_zero(self) -> bool:  # type: ignore[override]
        return self.options.identity_init

    def apply(
        self, backbone: nn.Module, condition: Condition, extras: nn.ModuleDict
    ) -> list[Replacement]:
        opts = self.options
        encoder = build_encoding(
            opts.encoding, dim=opts.encoding_dim, lambdas=opts.lambdas, seed=opts.seed
        )
        extras["encoder"] = encoder
        skip = re.compile(opts.film_skip)

        def dual_norm(name: str, norm: nn.Module) -> nn.Module:
            film = None
            if skip.search(name) is None and _has_affine(norm):
                film = FiLM(
                    norm_channels(norm), channel_dim(norm), encoder, condition,
                    opts.identity_init,
                )
            return DualNorm(norm, condition, post=film)

        done = replace_modules(
            backbone,
            lambda _, m: is_norm(m),
            dual_norm,
            lambda new: "DualNorm" if new.post is None else "DualNorm + FiLM",
        )
        done = done or film_after_convs(backbone, condition, encoder, opts)
        if not done:
            raise NothingToConditionError(
                f"method 'film' found no norm layer to condition in {type(backbone).__name__}: "
                "it needs BatchNorm2d, LayerNorm or GroupNorm layers (or timm subclasses such "
                "as BatchNormAct2d, LayerNorm2d, GroupNormAct), or, in a norm-free network, "
                "convolutions with a bias"
            )
        return done

    def default_sampler(self) -> LambdaSampler:
        return DiscreteLambdaSampler(self.options.lambdas)

    def check_sampler(self, sampler: LambdaSampler) -> None:
        """Orthogonal codes: every code must be trained. The code of a λ that the sampler
        never draws is orthogonal to every trained code, so its FiLM generators get no
        gradient, and λ near it would be served by the random initial projection."""
        trained = getattr(sampler, "lambdas", None)
        if self.options.encoding != "orthogonal" or trained is None:
            return  # continuous encodings (and continuous samplers) leave no code untrained
        untrained = sorted(set(self.options.lambdas) - {float(v) for v in trained})
        if untrained:
            raise ValueError(
                f"film's orthogonal λ codes are for {list(self.options.lambdas)}, but training "
                f"draws λ from {sorted(trained)}: the codes of {untrained} would stay untrained. "
                f"Wrap with lambdas={tuple(sorted(trained))} (oat-plugins train --lambdas "
                "sets both) or use encoding='sinusoidal'"
            )

_CHANNEL_GATE = re.compile(r"(^|\.)(se|attn)(\.|$)")


def film_after_convs(
    backbone: nn.Module, condition: Condition, encoder: nn.Module, opts: FilmOptions
) -> list[Replacement]:
    """The FiLM sites of a norm-free network (NF-ResNet, NFNet, VGG without BN): a FiLM on
    the output of every main-path conv that has a bias and a per-channel output scale to fold
    γ into (:class:`~oat_plugins.layers.conv_film.ConvFiLM`). Convs matching ``film_skip``
    (shortcuts) are left alone, as their norms would be, and so are the convs of channel
    gates (squeeze-excitation ``se`` / ``attn`` modules), which have no norm in normalised
    networks either. Returns [] if there is none."""
    skip = re.compile(opts.film_skip)
    scales: dict[str, str] = {}

    def is_site(name: str, module: nn.Module) -> bool:
        excluded = skip.search(name) or _CHANNEL_GATE.search(name)
        scale = None if excluded else output_scale_parameter(module)
        if scale is not None:
            scales[name] = scale
        return scale is not None

    def film_conv(name: str, conv: nn.Module) -> nn.Module:
        film = FiLM(conv.out_channels, 1, encoder, condition, opts.identity_init)
        return ConvFiLM(conv, film, scales[name])

    return replace_modules(backbone, is_site, film_conv, "FiLM after conv (no norm)")


def _has_affine(norm: nn.Module) -> bool:
    """Whether a FiLM after ``norm`` can be folded into it on export: a per-channel weight and
    bias (a norm without them, e.g. metaformer's LayerNorm2dNoBias, gets the dual norm only)."""
    return isinstance(getattr(norm, "weight", None), torch.Tensor) and isinstance(
        getattr(norm, "bias", None), torch.Tensor)
