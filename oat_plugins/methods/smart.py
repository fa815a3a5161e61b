"""``smart``: SMART, sparse mixture once-for-all adversarial training (Kundu et al., 2023).

One set of shared weights W, two binary masks per conditioned weight: the clean path computes
with W ⊙ M_c (λ = 0), the adversarial path with W ⊙ M_a (λ = 1); every norm is a dual norm.
Masks are chosen once (randomly as in the public prototypes, by magnitude, or by SNIP-style
saliency of each path's loss), with a chosen density per path and a chosen overlap, and are
buffers saved with the model. See ``docs/methods/smart.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torchattacks
from torch import nn

from ..condition import Condition
from ..layers import DualNorm, is_norm
from ..layers.expert_masks import (
    LAMBDA_RULES,
    ExpertMasks,
    apply_expert_masks,
    expert_masks,
    measuring,
    zero_outside_union,
)
from ..layers.mask_selection import (
    check_pair,
    magnitude_scores,
    mask_pair_from_scores,
    random_scores,
    saliency_scores,
)
from ..samplers import ExtremesLambdaSampler, LambdaSampler
from ..stats import count_nonzero
from ..surgery import NothingToConditionError, Replacement, replace_modules
from .base import Method, check_choice, register_method
from .sites import CONV_TYPES, weight_sites

if TYPE_CHECKING:
    from ..model import ConditionalModel

SELECTIONS = ("random", "magnitude", "saliency")
SALIENCY_EPS = 8 / 255
"""L∞ radius of the one-step FGSM batch on which the adversarial mask's saliency is measured."""


@dataclass
class SmartOptions:
    """Options of the ``smart`` method.

    density: fraction of each conditioned weight kept by each path (one number), or
        ``[clean, adversarial]``.
    overlap: fraction of the (smaller) path's kept weights that the other path keeps too:
        0 = disjoint masks (the prototypes), 1 = one mask inside the other (identical at equal
        densities). Infeasible combinations (e.g. density 0.6 with overlap 0) are refused.
    layers: which conditioned weights get the two masks (the others stay dense and shared):
        ``'all'``, ``'last:K'`` (from the K-th last stage of the backbone's ``feature_info``
        to the end) or a regular expression searched in module names.
    selection: ``'random'`` (seeded; the prototypes), ``'magnitude'`` (|W|, the two masks
        dealt alternate ranks) or ``'saliency'`` (SNIP |∂L/∂W ⊙ W| of the clean loss on a
        clean batch for M_c and of the adversarial loss on an FGSM batch for M_a, measured
        by ``prepare`` on the first training batch).
    lambda_rule: ``'switch'`` (default; the prototypes): M_c at λ = 0, M_a at any λ > 0, like
        the dual norm; ``'blend'``: W ⊙ ((1 − λ)·M_c + λ·M_a). Measured on models trained at
        λ ∈ {0, 1} (bench/smart.py), the blend at λ = 0.5 was worse than both paths in clean
        and robust accuracy; trained on OAT's λ set it fell to chance at λ = 1 (the one
        robust norm serves every λ > 0; bench/RESULTS.md §12), so it is not the default.
    linear, include_head: as for ``float``: which weights are conditioned.
    dual_norm: every norm becomes a dual norm (clean branch at λ = 0, robust at λ > 0).
    seed: seed of the random selection.
    """

    density: float | list[float] = 0.5
    overlap: float = 0.0
    layers: str = "all"
    selection: str = "random"
    lambda_rule: str = "switch"
    linear: bool | None = None
    include_head: bool = False
    dual_norm: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        density = self.density
        if isinstance(density, (list, tuple)):
            if len(density) != 2:
                raise ValueError(f"density must be one number or a [clean, adversarial] pair, "
                                 f"got {density!r}")
            self.density = [_number(d) for d in density]
        else:
            self.density = _number(density)
        check_pair(self.densities, self.overlap)
        self.overlap = float(self.overlap)
        check_choice(self.selection, SELECTIONS, "selection")
        check_choice(self.lambda_rule, LAMBDA_RULES, "lambda_rule")
        _check_layers(self.layers)
        self.seed = int(self.seed)

    @property
    def densities(self) -> tuple[float, float]:
        """(clean, adversarial) densities."""
        d = self.density
        return (d[0], d[1]) if isinstance(d, list) else (d, d)


def _number(value: object) -> float | object:
    """Floats pass through as floats; anything else is left for check_pair to refuse."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _check_layers(layers: object) -> None:
    if not isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be 'all', 'last:K' or a regular expression, got "
                         f"{layers!r}")
    if layers.startswith("last:"):
        k = layers.removeprefix("last:")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"layers={layers!r}: 'last:K' needs a whole number K >= 1")
    elif layers != "all":
        try:
            re.compile(layers)
        except re.error as err:
            raise ValueError(f"layers={layers!r} is not a valid regular expression: {err}"
                             ) from None


def select_layers(backbone: nn.Module, sites: list[tuple[str, nn.Module]], layers: str
                  ) -> list[tuple[str, nn.Module]]:
    """The sites chosen by the ``layers`` option (see :class:`SmartOptions`)."""
    if layers == "all":
        return sites
    if not layers.startswith("last:"):
        pattern = re.compile(layers)
        return [(n, m) for n, m in sites if pattern.search(n)]
    k = int(layers.removeprefix("last:"))
    stages = [f["module"] for f in getattr(backbone, "feature_info", None) or []
              if isinstance(f, dict) and "module" in f]
    if len(stages) < k:
        raise ValueError(f"layers={layers!r} needs a backbone whose feature_info lists at "
                         f"least {k} stages; {type(backbone).__name__} lists {len(stages)}")
    order = {name: i for i, (name, _) in enumerate(backbone.named_modules())}
    start = order[stages[-k]]
    return [(n, m) for n, m in sites if order[n] >= start]


class PathCost(NamedTuple):
    """Non-zero parameters and multiply-accumulates of one path (or of the union, or the
    dense backbone)."""

    params: int
    macs: int


@register_method
class Smart(Method):
    """SMART: two binary masks (clean M_c, adversarial M_a) on every conditioned weight,
    shared underlying weights, dual norms. A per-sample λ is served by one forward per λ
    value (``lambda_groups``)."""

    name = "smart"
    Options = SmartOptions
    lambda_groups = True

    @property
    def identity_at_zero(self) -> bool:  # type: ignore[override]
        return self.options.densities[0] == 1.0  # a sparse clean mask changes the function

    def apply(self, backbone: nn.Module, condition: Condition, extras: nn.ModuleDict
              ) -> list[Replacement]:
        opts = self.options
        sites = select_layers(backbone, weight_sites(backbone, opts.linear, opts.include_head),
                              opts.layers)
        if not sites:
            raise NothingToConditionError(
                f"method 'smart' found no weight to mask in {type(backbone).__name__} with "
                f"layers={opts.layers!r}: it needs nn.Conv1d/2d/3d layers (or nn.Linear with "
                "linear=True, or the head with include_head=True)")
        pairs = self._initial_masks([m.weight for _, m in sites])
        done = []
        change = f"W ⊙ M(λ), {opts.lambda_rule} of two masks"
        for (name, module), (clean, adversarial) in zip(sites, pairs, strict=True):
            masks = ExpertMasks(module.weight.shape, condition, clean=clean,
                                adversarial=adversarial, rule=opts.lambda_rule,
                                device=module.weight.device)
            apply_expert_masks(module, masks)
            done.append(Replacement(f"{name}.weight", type(module).__name__, change))
        if opts.dual_norm:
            done += replace_modules(backbone, lambda _, m: is_norm(m),
                                    lambda _, m: DualNorm(m, condition), "DualNorm")
        return done

    def _initial_masks(self, weights: list[torch.Tensor]
                       ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        opts = self.options
        if opts.selection == "saliency":
            return [(None, None)] * len(weights)  # pending until prepare
        if opts.selection == "random":
            scores = random_scores([*weights, *weights], opts.seed)
            clean, adversarial = scores[:len(weights)], scores[len(weights):]
        else:
            clean = adversarial = magnitude_scores(weights)
        return [mask_pair_from_scores((c, a), opts.densities, opts.overlap)
                for c, a in zip(clean, adversarial, strict=True)]

    def prepare(self, model: ConditionalModel, x: torch.Tensor, y: torch.Tensor) -> None:
        """Choose pending saliency masks on this batch (nothing when the masks are set)."""
        found = expert_masks(model.backbone)
        if not any(masks.pending for _, _, masks in found):
            return
        originals = [mod.parametrizations[name].original for mod, name, _ in found]
        with measuring([masks for _, _, masks in found]):
            with model.at(0.0):
                clean = saliency_scores(model, originals, x, y)
            with model.at(1.0):
                x_adv = torchattacks.FGSM(model, eps=SALIENCY_EPS)(x, y)
                adversarial = saliency_scores(model, originals, x_adv, y)
        for (module, name, masks), c, a in zip(found, clean, adversarial, strict=True):
            masks.set_masks(*mask_pair_from_scores((c, a), self.options.densities,
                                                   self.options.overlap))
            zero_outside_union(module, masks, name)

    def report(self, model: ConditionalModel) -> list[str]:
        found = expert_masks(model.backbone)
        if any(masks.pending for _, _, masks in found):
            return ["  expert masks: pending (chosen from the first training batch by prepare)"]
        size = probe_size(model)
        costs = path_costs(model, size)
        n = sum(m.clean.numel() for _, _, m in found)
        share = [sum(int(t.sum()) for t in ts) / n for ts in (
            [m.clean for _, _, m in found], [m.adversarial for _, _, m in found],
            [m.clean & m.adversarial for _, _, m in found])]
        lines = [f"  expert masks ({self.options.selection}, λ rule "
                 f"{self.options.lambda_rule!r}) on {len(found)} weights: clean "
                 f"{100 * share[0]:.1f} %, adversarial {100 * share[1]:.1f} %, shared "
                 f"{100 * share[2]:.1f} % of {n:,} entries"]
        labels = {"clean": "clean path (λ=0)", "adversarial": "adversarial path (λ=1)",
                  "union": "both paths stored"}
        return lines + [_cost_line(labels[k], costs[k], costs["dense"], size) for k in labels]

    def check_sampler(self, sampler: LambdaSampler) -> None:
        """Both paths must be trained: the sampler must draw λ = 0 and some λ > 0."""
        lam = sampler(4096, torch.Generator().manual_seed(0))
        if not bool((lam == 0).any()) or not bool((lam > 0).any()):
            raise ValueError("method 'smart' trains a clean path (λ = 0) and an adversarial "
                             "path (λ > 0); the λ sampler must draw both")

    def default_sampler(self) -> LambdaSampler:
        """Half of each batch at λ = 0 (clean path), half at λ = 1 (adversarial path)."""
        return ExtremesLambdaSampler()


def _cost_line(label: str, cost: PathCost, dense: PathCost, size: tuple[int, ...]) -> str:
    return (f"  {label}: {cost.params:,} non-zero parameters "
            f"({dense.params / max(cost.params, 1):.2f}× fewer than dense {dense.params:,}), "
            f"{cost.macs:,} MACs at {'×'.join(map(str, size))} "
            f"({dense.macs / max(cost.macs, 1):.2f}× fewer)")


def probe_size(model: ConditionalModel) -> tuple[int, ...]:
    """(C, H, W) of the backbone's configured input (a ViT's ``img_size``, else timm's
    ``pretrained_cfg['input_size']``, else 3×224×224)."""
    img = getattr(getattr(model.backbone, "patch_embed", None), "img_size", None)
    channels = model.in_chans or 3
    if img is not None:
        return (channels, *map(int, img))
    size = model.pretrained_cfg.get("input_size")
    return tuple(size) if size else (channels, 224, 224)


@torch.no_grad()
def path_costs(model: ConditionalModel, input_size: tuple[int, ...]) -> dict[str, PathCost]:
    """Non-zero parameters and MACs of the clean path, the adversarial path, both paths as
    stored (the union of the masks, both norm copies) and the dense backbone.

    Parameters of a path: the non-zeros of the plain model exported at λ = 0 or 1. MACs: for
    every conv and linear layer, the non-zeros of the weight it computes with times the
    positions it is applied at (output spatial size, or tokens), measured by a forward hook
    on one probe input of ``input_size``; the dense reference counts every weight entry.
    Norms, activations and biases are not counted as MACs.
    """
    positions = _positions(model.method.export(model, 0.0), input_size)
    weights = {name: _path_weights(module) for name, module in model.backbone.named_modules()
               if name in positions}
    stored = sum(int((p != 0).sum()) for p in model.backbone.parameters())
    costs = {}
    for index, key in enumerate(("clean", "adversarial", "union", "dense")):
        macs = sum(positions[n] * (w[index].numel() if key == "dense" else
                                   int((w[index] != 0).sum())) for n, w in weights.items())
        if key in ("clean", "adversarial"):
            params = count_nonzero(model.method.export(model, float(index))).nonzero
        elif key == "union":
            params = stored
        else:
            params = sum(p.numel() for p in model.method.export(model, 0.0).parameters())
        costs[key] = PathCost(params, macs)
    return costs


def _path_weights(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """(clean, adversarial, union, dense) weights of one layer."""
    masks = [m for _, _, m in expert_masks(module)]
    if not masks:
        return (module.weight,) * 4
    original = module.parametrizations.weight.original
    m = masks[0]
    return original * m.clean, original * m.adversarial, original * m.union, original


def _positions(plain: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Per conv/linear layer name: output positions per output channel on one probe input."""
    found: dict[str, int] = {}
    hooks = []
    for name, module in plain.named_modules():
        if isinstance(module, (*CONV_TYPES, nn.Linear)):
            def hook(mod, _inputs, output, name=name):
                channels = mod.out_channels if isinstance(mod, CONV_TYPES) else mod.out_features
                found[name] = found.get(name, 0) + output.numel() // channels
            hooks.append(module.register_forward_hook(hook))
    param = next(plain.parameters())
    try:
        plain.eval()(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    return found
