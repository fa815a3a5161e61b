"""``float`` / ``floats``: FLOAT, weight-conditioned once-for-all training with no extra layers
(Kundu et al., WACV 2023), and FLOATS, FLOAT on a one-shot pruned (sparse) network.

Every conv weight (and, by option, linear weight) becomes W_eff = W + α·λ·η through a
``torch.nn.utils.parametrize`` parametrization, so each module keeps its own class and forward
(timm's Conv2dSame, StdConv2d, ...); every norm becomes a dual norm (clean branch at λ = 0,
robust branch at λ > 0). With ``density`` set, a fixed binary mask M makes the effective weight
(W + α·λ·η) ⊙ M sparse at every λ. See ``docs/methods/float.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..condition import Condition
from ..layers import DualNorm, is_norm
from ..layers.mask_selection import (
    check_density,
    check_scope,
    magnitude_scores,
    masks_from_scores,
    saliency_scores,
)
from ..layers.weight_mask import WeightMask, apply_mask, masked_density, weight_masks
from ..layers.weight_noise import NOISE_MODES, WeightNoise
from ..losses import LossContext, Stats, batch_stats, oat_loss_terms
from ..samplers import DiscreteLambdaSampler, ExtremesLambdaSampler, LambdaSampler
from ..surgery import NothingToConditionError, Replacement, replace_modules
from .base import Method, check_choice, register_method
from .sites import CONV_TYPES, weight_sites  # noqa: F401  (CONV_TYPES: old import path)

if TYPE_CHECKING:
    from ..model import ConditionalModel

PRUNE_CRITERIA = ("magnitude", "snip")

RECIPES = ("reference", "oat", "extremes")
"""FLOAT training recipes (the ``recipe`` option); see ``docs/methods/float.md``."""
DEFAULT_RECIPE = "oat"

NORM_RULES = ("switch", "interpolate")
"""Dual-norm rule at intermediate λ (the ``norm_rule`` option)."""
RECIPE_NORM_RULES = {"oat": "interpolate", "reference": "switch", "extremes": "switch"}
"""Each recipe's norm rule when ``norm_rule`` is not given: 'oat' with 'interpolate' is the
pair measured to make λ a dial (bench/RESULTS.md §10); the other two are published with the
switch (the authors' code, the recipe as first landed)."""

ROBUST_CLEAN_LAMBDA = 1e-4
"""λ at which the ``reference`` recipe trains the robust branch on clean images: any λ > 0
selects the robust norm, and the weight noise α·λ·η is 10⁻⁴ of its λ = 1 size (the
authors' "robust BN, no noise"), without a second switch besides λ."""


@dataclass
class FloatOptions:
    """Options of the ``float`` method (``floats`` has the same ones, with ``density=0.5``).

    noise: ``'fixed'`` (η drawn once from ``seed`` and saved: deterministic, exportable) or
        ``'resample'`` (η redrawn every forward as in the authors' code: a random model at
        λ > 0 that needs EOT attacks to evaluate and cannot be exported).
    alpha_init: initial value of the learnable noise scale α.
    alpha_per_channel: one α per output channel instead of one per layer.
    linear: also condition ``nn.Linear`` weights. None (auto): only when linear layers (the
        head excluded) hold more weights than convolutions, e.g. ViTs or ConvNeXt's MLPs.
    include_head: also condition (and, with ``density``, prune) the classifier head
        (``backbone.get_classifier()``).
    dual_norm: every norm becomes a :class:`~oat_plugins.layers.DualNorm` (FLOAT's dual BN).
    density: FLOATS: fraction of the conditioned weights kept by a fixed one-shot mask
        (None: dense FLOAT).
    prune: mask criterion: ``'magnitude'`` (|W| at wrap time) or ``'snip'`` (|∂L/∂W ⊙ W| on a
        batch; the masks stay pending until the method's ``prepare`` (called by ``fit`` with
        the first batch) or :func:`snip_prune` chooses them).
    prune_scope: ``'layer'`` (each layer kept at ``density``) or ``'global'`` (one threshold).
    seed: seed of the fixed noise (layer i uses a generator seeded from (seed, i)).
    recipe: training recipe (the method's loss and default λ sampler):
        ``'oat'`` (default): OAT's loss and OAT's λ set {0, .1, .2, .3, .4, 1} (noise scaled
        by λ), the recipe measured to give a dial with ``norm_rule='interpolate'``;
        ``'reference'``: the authors' code; half of each batch at λ = 0, half at
        λ = 1, every sample's clean image in the loss (the λ > 0 half on the robust norm
        with no noise, at λ = ``ROBUST_CLEAN_LAMBDA``):
        ``mean_i[0.5·CE(f_{0 or ε}(x_i)) + 0.5·[λ_i > 0]·CE(f_λi(x_adv_i))]``;
        ``'extremes'``: OAT's loss on FLOAT's two extremes (the clean term of the λ = 1 half
        weighs 0: the robust branch never sees a clean image).
    norm_rule: ``'interpolate'``: (1 − λ)·clean(x) + λ·robust(x) at 0 < λ < 1 (still one
        plain norm when exported); ``'switch'``: the shared dual-norm rule, any λ > 0 on the
        robust norm (the authors' code switches at λ ≥ 0.1). Default (None): the recipe's
        own (:data:`RECIPE_NORM_RULES`: 'interpolate' for 'oat', 'switch' for the others;
        'switch' without dual norms); the checkpoint stores the rule chosen.
    """

    noise: str = "fixed"
    alpha_init: float = 0.25
    alpha_per_channel: bool = False
    linear: bool | None = None
    include_head: bool = False
    dual_norm: bool = True
    density: float | None = None
    prune: str = "magnitude"
    prune_scope: str = "layer"
    seed: int = 0
    recipe: str = DEFAULT_RECIPE
    norm_rule: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.recipe, RECIPES, "FLOAT recipe")
        if self.norm_rule is None:
            self.norm_rule = RECIPE_NORM_RULES[self.recipe] if self.dual_norm else "switch"
        check_choice(self.norm_rule, NORM_RULES, "norm_rule")
        if self.norm_rule != "switch" and not self.dual_norm:
            raise ValueError(f"norm_rule={self.norm_rule!r} needs dual_norm=True")
        check_choice(self.noise, NOISE_MODES, "noise mode")
        if self.density is not None:
            check_density(self.density)
            self.density = float(self.density)
        check_choice(self.prune, PRUNE_CRITERIA, "prune criterion")
        check_scope(self.prune_scope)
        self.alpha_init = float(self.alpha_init)
        self.seed = int(self.seed)


@dataclass
class FloatsOptions(FloatOptions):
    """Options of ``floats``: those of ``float`` with a required ``density`` (default 0.5)."""

    density: float | None = 0.5

    def __post_init__(self) -> None:
        if self.density is None:
            raise ValueError("method 'floats' needs a density in (0, 1]; use method 'float' "
                             "for a dense model")
        super().__post_init__()


def _layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63 - 1)


@register_method
class Float(Method):
    """FLOAT: W_eff = W + α·λ·η on every conv (optionally linear) weight, dual norms; FLOATS
    with ``density``. No layer is added: the overhead is one α per layer (or per output
    channel) and the second copy of each norm.

    A per-sample λ is served by one backbone forward per distinct λ value
    (``lambda_groups``): a weight cannot differ per sample inside one batched convolution.
    """

    name = "float"
    Options = FloatOptions
    lambda_groups = True

    @property
    def identity_at_zero(self) -> bool:  # type: ignore[override]
        return self.options.density is None  # a mask changes the weights at every λ

    def apply(
        self, backbone: nn.Module, condition: Condition, extras: nn.ModuleDict
    ) -> list[Replacement]:
        opts = self.options
        sites = weight_sites(backbone, opts.linear, opts.include_head)
        if not sites:
            raise NothingToConditionError(
                f"method {self.name!r} found no weight to condition in "
                f"{type(backbone).__name__}: it needs nn.Conv1d/2d/3d layers (or nn.Linear "
                "with linear=True, or the head with include_head=True)"
            )

        masks: list[WeightMask | None] = [None] * len(sites)
        if opts.density is not None:
            if opts.prune == "magnitude":
                chosen = masks_from_scores(magnitude_scores([m.weight for _, m in sites]),
                                           opts.density, opts.prune_scope)
                masks = [WeightMask(c.shape, c) for c in chosen]
            else:
                masks = [WeightMask(m.weight.shape, device=m.weight.device) for _, m in sites]

        done = []
        change = "W + α·λ·η" + (" then ⊙ mask" if opts.density is not None else "")
        for index, ((name, module), mask) in enumerate(zip(sites, masks, strict=True)):
            original_type = type(module).__name__
            noise = WeightNoise(
                module.weight, condition, noise=opts.noise, alpha_init=opts.alpha_init,
                alpha_per_channel=opts.alpha_per_channel, seed=_layer_seed(opts.seed, index),
            )
            parametrize.register_parametrization(module, "weight", noise)
            if mask is not None:
                apply_mask(module, mask)
            done.append(Replacement(f"{name}.weight", original_type, change))

        if opts.dual_norm:
            mix = opts.norm_rule == "interpolate"
            done += replace_modules(backbone, lambda _, m: is_norm(m),
                                    lambda _, m: DualNorm(m, condition, interpolate=mix),
                                    "DualNorm")
        return done

    def prepare(self, model: ConditionalModel, x: torch.Tensor, y: torch.Tensor) -> None:
        """Choose pending data-driven masks (``prune='snip'``) on this batch; nothing
        otherwise."""
        if any(mask.pending for _, _, mask in weight_masks(model.backbone)):
            snip_prune(model, x, y)

    def set_density(self, model: ConditionalModel, density: float) -> None:
        """Keep the largest |W| of the trained mask at ``density`` (≤ the trained density;
        same scope as the trained mask). The dropped weights keep their values in the
        parameter, so asking for the trained density again restores its mask exactly."""
        found = weight_masks(model.backbone)
        trained = self.options.density
        if trained is None or not found:
            return super().set_density(model, density)  # raises: no mask, no density knob
        if any(mask.pending for _, _, mask in found):
            raise ValueError("the masks are not chosen yet (pending until the first training "
                             "batch): train the model before setting a density")
        check_density(density)
        if density > trained + 1e-9:
            raise ValueError(f"density {density:g} is above the trained density {trained:g}: "
                             "the weights outside the trained mask are zero; allowed: "
                             f"(0, {trained:g}]")
        with torch.no_grad():
            weights = [m.parametrizations[name].original for m, name, _ in found]
            # The trained mask's entries are the non-zero ones (apply_mask zeroed the rest,
            # which no gradient or weight decay moves): the nested masks stay inside it.
            chosen = masks_from_scores(magnitude_scores(weights), density,
                                       self.options.prune_scope, alive=[w != 0 for w in weights])
        for (_, _, mask), keep in zip(found, chosen, strict=True):
            mask.set_mask(keep)

    def report(self, model: ConditionalModel) -> list[str]:
        found = weight_masks(model.backbone)
        if not found:
            return []
        if any(mask.pending for _, _, mask in found):
            return ["  masks: pending (chosen from the first training batch by prepare)"]
        return [f"  masked weights kept: {100.0 * masked_density(model.backbone):.1f} % "
                f"({self.options.prune}, {self.options.prune_scope} scope)"]

    def default_sampler(self) -> LambdaSampler:
        """The recipe's λ sampler: FLOAT's two extremes (half of each batch at λ = 0, half at
        λ = 1) for ``'reference'`` and ``'extremes'``, OAT's set for ``'oat'``."""
        if self.options.recipe == "oat":
            return DiscreteLambdaSampler()
        return ExtremesLambdaSampler()

    def training_loss(self, ctx: LossContext) -> tuple[torch.Tensor, Stats]:
        """The recipe's loss (see :class:`FloatOptions`)."""
        if self.options.recipe == "reference":
            return reference_loss_terms(ctx)
        return oat_loss_terms(ctx)


@register_method
class Floats(Float):
    """FLOATS: FLOAT on a network pruned once, before training, to ``density`` (default 0.5)."""

    name = "floats"
    Options = FloatsOptions


def reference_loss_terms(ctx: LossContext) -> tuple[torch.Tensor, Stats]:
    """The FLOAT authors' loss: ``Σ_i [0.5·CE(f_ci(x_i)) + 0.5·[λ_i > 0]·CE(f_λi(x_adv_i))] / N``
    with c_i = 0 for λ_i = 0 (clean norm) and c_i = :data:`ROBUST_CLEAN_LAMBDA` for λ_i > 0
    (robust norm, no noise to speak of): the robust branch is trained on clean images without
    noise and on adversarial ones with noise λ_i, so λ moves it between the two.

    One forward on ``[x ; x_adv]``; the statistics count every clean row."""
    adv = ctx.adversarial
    clean_lam = torch.where(adv, torch.full_like(ctx.lam, ROBUST_CLEAN_LAMBDA),
                            torch.zeros_like(ctx.lam))
    inputs = torch.cat([ctx.x, ctx.x_adv])
    targets = torch.cat([ctx.y, ctx.y[adv]])
    with ctx.autocast():
        logits = ctx.forward(inputs, torch.cat([clean_lam, ctx.lam[adv]]))
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = 0.5 * losses.sum() / ctx.x.shape[0]
    return loss, batch_stats(ctx, logits, targets, n_clean=ctx.x.shape[0])


def snip_prune(
    model: ConditionalModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    density: float | None = None,
    scope: str | None = None,
) -> None:
    """Choose FLOATS masks by SNIP saliency |∂L/∂W ⊙ W| on one batch, in place.

    ``model`` is a :class:`~oat_plugins.ConditionalModel` wrapped with a density (``floats``,
    or ``float`` with ``density=``); ``x`` are images in [0, 1], ``y`` class indices, L the
    cross-entropy at λ = 0 (clean weights, clean norms) in the model's current train/eval
    mode, measured as :func:`~oat_plugins.layers.mask_selection.saliency_scores` describes
    (residual branches open; parameters and buffers restored). Weights that are already
    pruned are never revived. ``density`` and ``scope`` default to the model's options.
    Masked weights are zeroed and the option ``prune`` becomes ``'snip'``. Call it once,
    before training (non-iterative pruning); ``fit`` does it for ``prune='snip'``.
    """
    found = weight_masks(model)
    options = getattr(getattr(model, "method", None), "options", None)
    if not found or not isinstance(options, FloatOptions) or options.density is None:
        raise ValueError("snip_prune needs a model wrapped with method 'floats' (or 'float' "
                         "with density=...)")
    density = options.density if density is None else density
    scope = options.prune_scope if scope is None else scope
    check_density(density)
    check_scope(scope)
    masks = [mask for _, _, mask in found]
    originals = [mod.parametrizations[name].original for mod, name, _ in found]
    alive = [mask.mask.clone() for mask in masks]  # a pending mask is all ones
    with _measurable(masks), model.at(0.0):
        scores = saliency_scores(model, originals, x, y)
    chosen = masks_from_scores(scores, density, scope, alive=alive)
    with torch.no_grad():
        for mask, keep, original in zip(masks, chosen, originals, strict=True):
            mask.set_mask(keep)
            original.mul_(keep.to(original.dtype))
    options.prune = "snip"
    options.density = float(density)
    options.prune_scope = scope


@contextlib.contextmanager
def _measurable(masks: list[WeightMask]) -> Iterator[None]:
    """Let pending (all-ones) masks run a forward while their saliency is measured."""
    pending = [mask.pending for mask in masks]
    for mask in masks:
        mask.pending = False
    try:
        yield
    finally:
        for mask, was in zip(masks, pending, strict=True):
            mask.pending = was
