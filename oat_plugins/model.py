"""``ConditionalModel`` and ``wrap``; ``save``/``load`` and the other file functions live in
:mod:`oat_plugins.checkpoint` and are re-exported here."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.transforms import Normalize

from .checkpoint import (  # noqa: F401 (the file API, re-exported from its old home)
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    check_header,
    file_header,
    from_checkpoint,
    load,
    note_reset_classifier,
    read_checkpoint,
    save,
    timm_spec,
    to_checkpoint,
)
from .checkpoint import in_chans_of as _in_chans
from .condition import Condition, Lambda, lambda_groups
from .exits import MultiExitAPI, MultiExitNet, attach_exits, exit_sum_loss, export_exits
from .layers.base import ConditionedModule, FoldableParametrization, FoldCache
from .losses import LossContext, Stats
from .methods import Method, get_method
from .stats import count_nonzero
from .surgery import folded_state, foreign_modules, summarize

logger = logging.getLogger(__name__)

SERVE_AFTER = 16
"""Forwards with nothing changed before a model serves its export (see
``ConditionalModel.served_export``): more than a training attack's steps (a copy of the model
per training step costs more than it saves), few against an evaluation's batches."""

_RANGE_TOLERANCE = 1e-4
_FAR_OUTSIDE = (-1.0, 2.0)
"""Inputs beyond these bounds are refused unless their mean is that of images (see below)."""
_IMAGE_MEAN = (0.3, 0.9)
"""Mean of a batch of images in [0, 1] (natural images: about 0.45), also with zero-mean noise
added by an attack; normalised images have a mean near 0 (ImageNet-normalised uniform noise:
0.23), 0-255 images far above 1."""


class ConditionalModel(MultiExitAPI, nn.Module):
    """A backbone conditioned on λ ∈ [0, 1] (0: clean accuracy, 1: robustness).

    ``forward(x)`` takes one batch of images in [0, 1] of shape (N, C, H, W) and normalises
    internally, so attacks (torchattacks), RobustBench and timm code use it as an ordinary
    classifier. λ is set with :meth:`set_lambda`, or for a while with :meth:`at`. Build one
    with :func:`oat_plugins.wrap`. What the model does at each step is the method's (see
    :class:`~oat_plugins.Method`). With exits (``wrap(..., exits=...)``), ``forward`` is
    input-adaptive inference with early stopping, and the training loss is the method's,
    summed over the exits (:mod:`oat_plugins.exits`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: Method,
        *,
        normalize: tuple[Sequence[float], Sequence[float]] | None,
        backbone_spec: dict[str, Any] | None = None,
        check_inputs: bool = True,
        exits: object = None,
        exit_weights: object = None,
    ) -> None:
        super().__init__()
        if any(isinstance(m, (ConditionedModule, FoldableParametrization))
               for m in backbone.modules()):
            raise ValueError("this backbone is already conditioned; wrap a plain model")
        self.method = method
        self.condition = Condition()
        self.extras = nn.ModuleDict()
        exits = method.default_exits if exits is None else exits
        if exits is not None and type(method).forward is not Method.forward:
            raise ValueError(f"method {method.name!r} has its own forward; it cannot have exits")
        # Before the surgery, so the method conditions the exit heads like the backbone.
        self.exits = attach_exits(backbone, exits, exit_weights)
        self.replacements = method.apply(backbone, self.condition, self.extras)
        self.backbone = backbone
        self.normalize_stats = (
            None if normalize is None else (tuple(map(float, normalize[0])),
                                            tuple(map(float, normalize[1])))
        )
        self.normalize = nn.Identity() if normalize is None else Normalize(*self.normalize_stats)
        self.backbone_spec = backbone_spec
        self.check_inputs = check_inputs
        self.in_chans = _in_chans(backbone)
        self.serve_exports = True
        self.serve_after = SERVE_AFTER
        self._served: FoldCache[_HeldExport] = FoldCache()
        # One per inference mode: tensors made under it cannot be saved for a backward pass,
        # and inference tensors cannot be written outside it.
        self._serving = {False: _ServedModule(), True: _ServedModule()}
        logger.info("wrapped %s with %r:\n%s", type(backbone).__name__, method.name,
                    summarize(self.replacements))

    # -- the condition -------------------------------------------------------------------
    @property
    def lam(self) -> Lambda:
        """The current λ: a float, or a (N,) tensor for per-sample conditioning."""
        return self.condition.lam

    def set_lambda(self, lam: object) -> ConditionalModel:
        """Set λ: a float in [0, 1] or a tensor of shape (N,), one λ per sample."""
        self.condition.lam = lam
        return self

    @contextlib.contextmanager
    def at(self, lam: object) -> Iterator[ConditionalModel]:
        """Hold λ = ``lam`` inside the block; the previous λ (a float or a per-sample tensor)
        is restored exactly on exit. The one idiom for setting λ for a while.

        >>> with model.at(0.3):
        ...     logits = model(x)
        """
        with self.condition.at(lam):
            yield self

    def set_density(self, density: float) -> ConditionalModel:
        """Keep only a fraction ``density`` of the masked weights: a compute knob set after
        training, like λ and the exit budget (masked methods: ``floats``, ``float`` with a
        density; others raise ``ValueError``). The largest weights of the trained mask stay,
        so the masks are nested; any density up to the trained one can be set again, and
        the trained one restores the trained model exactly. The masks are buffers: a saved
        model keeps the density it was saved at, and ``export`` folds it."""
        self.method.set_density(self, density)
        return self

    @contextlib.contextmanager
    def frozen(self) -> Iterator[ConditionalModel]:
        """Treat the conditioning weights as constants inside the block: at a scalar λ,
        conditioned layers serve pieces folded once per λ (as under ``torch.no_grad``), and
        no gradient reaches the conditioning parameters; gradients w.r.t. the inputs flow as
        usual. Training and evaluation run their attacks inside it.

        >>> with model.at(1.0), model.frozen():
        ...     x_adv = torchattacks.PGD(model)(x, y)
        """
        with self.condition.frozen():
            yield self

    def clear_fold_caches(self) -> None:
        """Drop every value folded at a λ (needed only after writing a parameter through
        ``.data``, which bypasses the version counters the caches check)."""
        for module in self.modules():
            for value in vars(module).values():
                if isinstance(value, FoldCache):
                    value.clear()
        self._drop_served()

    @property
    def method_name(self) -> str:
        return self.method.name

    @property
    def deterministic(self) -> bool:
        """False when the forward draws fresh randomness (e.g. FLOAT with resampled noise)."""
        return all(m.deterministic for m in self.modules()
                   if isinstance(m, FoldableParametrization))

    @property
    def backbone_name(self) -> str | None:
        """timm architecture name of the backbone, when known."""
        return (self.backbone_spec or {}).get("name")

    # -- forward and timm passthrough ----------------------------------------------------
    def prepare_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` (images in [0, 1], one λ per sample if λ is per-sample) and normalise."""
        if self.check_inputs:
            _check_images(x, self.in_chans)
        self.condition.check_batch(x.shape[0])
        return self.normalize(x)

    def _run(self, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
        """``fn(x)`` at the current λ. For a method with ``lambda_groups`` and a per-sample λ,
        one call per distinct λ value (each at that scalar λ), concatenated in input order."""
        if self.condition.is_scalar or not self.method.lambda_groups:
            return fn(x)
        self.condition.check_batch(x.shape[0])
        groups = lambda_groups(self.condition.lam.to(x.device))
        outputs = []
        for value, idx in groups:
            with self.condition.at(value, validate=False):
                outputs.append(fn(x if len(groups) == 1 else x[idx]))
        if len(groups) == 1:
            return outputs[0]
        inverse = torch.argsort(torch.cat([idx for _, idx in groups]))
        return _cat_groups(outputs, inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        served = self.served_export()
        if served is not None:
            return served(self.prepare_inputs(x))
        if self.exits is not None:
            return self._run(self.adaptive_forward, self.prepare_inputs(x))
        return self._run(lambda t: self.method.forward(self, t), self.prepare_inputs(x))

    def training_outputs(self, x: torch.Tensor) -> Any:
        """What the method's training loss needs for images ``x`` at the current λ (logits
        for most methods, see ``Method.training_forward``; every exit's logits with exits)."""
        if self.exits is not None:
            return self.exit_logits(x)
        return self._run(lambda t: self.method.training_forward(self, t), self.prepare_inputs(x))

    def training_loss(self, ctx: LossContext) -> tuple[torch.Tensor, Stats]:
        """The method's training loss of one batch; with exits, summed over the exits with
        their weights (see :func:`oat_plugins.exits.exit_sum_loss`)."""
        if self.exits is None:
            return self.method.training_loss(ctx)
        return exit_sum_loss(self.method.training_loss, ctx, self.exits.spec.weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` on [0, 1] images, at the current λ."""
        return self._run(self.backbone.forward_features, self.prepare_inputs(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's ``forward_head`` on features from :meth:`forward_features`."""
        return self._run(lambda t: self.backbone.forward_head(t, pre_logits=pre_logits), x)

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.backbone, "pretrained_cfg", {})

    def get_classifier(self) -> nn.Module:
        return self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """timm's ``reset_classifier``; the new head is plain (not conditioned)."""
        self.backbone.reset_classifier(num_classes, *args, **kwargs)
        self._drop_served()  # its tensors are found again: the head's are new
        note_reset_classifier(self.backbone_spec, num_classes, *args, **kwargs)

    # -- serving the export -----------------------------------------------------------------
    def served_export(self) -> nn.Module | None:
        """The plain module ``forward`` runs instead of the conditioned layers (without the
        normaliser), or None when the conditioned forward must run.

        When the model would serve folded weights anyway (``serve_exports``, eval mode, a
        scalar λ, no gradient wanted for the parameters: ``torch.no_grad``, inference mode or
        :meth:`frozen`), ``forward`` runs :meth:`export`'s module at the current λ: on a GPU the
        conditioned forward is launch-bound and pays Python per layer, the export does not.
        It is served from the first forward inside :meth:`frozen` (an attack: its steps run
        on unchanged weights), otherwise once ``serve_after`` such forwards (default
        :data:`SERVE_AFTER`) found nothing changed. It is valid for the last λ only and is
        renewed when λ, the inference mode or any parameter or buffer changes (object,
        storage or version: optimizer steps, ``load_state_dict``): the first time by copying
        and folding the model, later by writing the folded tensors into the same module in
        place (one copy of the weights, no new module; a training step's attack pays that,
        not a copy of the model). Memory: one more copy of the weights, kept also in
        training mode for the next attack; ``.to()`` and other moves drop it. Its parameters
        need no gradient; gradients w.r.t. the inputs flow. A model that draws fresh noise
        every forward (resample), or whose export is not possible yet (masks still to be
        chosen from data), runs conditioned. Set ``model.serve_exports = False`` to always
        run conditioned. The served module is a deep copy: forward hooks on inner modules
        are copied as they were when it was first built. After adding or removing such
        hooks, replacing submodules by hand or writing through ``.data``, call
        :meth:`clear_fold_caches`.
        """
        if not self.serve_exports or self.training or not self.condition.serves_folded:
            return None
        held = self._served.get(self.condition.lam, (), _HeldExport, module=self)
        held.forwards += 1
        at_once = self.condition.is_frozen and self._serving_now().refreshable
        if not held.built and (at_once or held.forwards >= self.serve_after):
            with torch.no_grad():
                held.module, held.built = self._export_to_serve(), True
        return held.module

    def _export_to_serve(self) -> nn.Module | None:
        """The served module at the current λ: the held one with its tensors refreshed, or
        a new export (None when the model cannot be served)."""
        if not self.deterministic:
            return None
        serving = self._serving_now()
        if serving.refresh(self._served_sources):
            return serving.module
        try:
            folded = self._fold_backbone(self.condition.lam)
        except RuntimeError as err:  # e.g. masks still to be chosen from data
            logger.debug("serving the conditioned forward: %s", err)
            return None
        targets = dict(folded.state_dict(keep_vars=True))  # before the exits are moved out
        served = self._with_exits(folded, exits=True).requires_grad_(False).eval()
        if isinstance(served, MultiExitNet):
            targets[_THRESHOLDS] = served.thresholds  # a copy of the router's
        serving.hold(served, targets)
        return served

    def _serving_now(self) -> _ServedModule:
        return self._serving[torch.is_inference_mode_enabled()]

    def _served_sources(self) -> dict[str, torch.Tensor]:
        """The tensors of the served module at the current λ, by the names of its targets."""
        sources = folded_state(self.backbone)
        if self.exits is not None:
            sources[_THRESHOLDS] = self.exits.thresholds
        return sources

    def _drop_served(self) -> None:
        self._served.clear()
        for held in self._serving.values():
            held.clear()

    def train(self, mode: bool = True) -> ConditionalModel:
        if mode:  # never served in training; the served module stays for the next attack
            self._served.clear()
        return super().train(mode)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> ConditionalModel:
        self._drop_served()  # .to(), .half(), ...: a held export would keep the old copy
        return super()._apply(fn, *args, **kwargs)

    # -- export and reporting --------------------------------------------------------------
    def export(self, lam: float | None = None, *, exits: bool = True) -> nn.Module:
        """A standalone plain model computing this model's function at a fixed scalar λ.

        The method folds its conditioning (by default: dual norm → the chosen norm with FiLM
        folded in, weight parametrizations → plain weights), so the backbone keeps its own
        class; when the model normalises, the result is ``nn.Sequential(normalize,
        backbone)``. No oat_plugins module remains, except, for a model with exits, the
        :class:`~oat_plugins.exits.MultiExitNet` container (plain backbone, plain heads, the
        current thresholds); ``exits=False`` gives the plain backbone alone.
        """
        backbone = self._export_backbone(self.condition.lam if lam is None else lam, exits)
        if self.normalize_stats is None:
            return backbone
        return nn.Sequential(Normalize(*self.normalize_stats), backbone)

    def _export_backbone(self, lam: object, exits: bool) -> nn.Module:
        """:meth:`export` without the normaliser."""
        return self._with_exits(self._fold_backbone(lam), exits)

    def _fold_backbone(self, lam: object) -> nn.Module:
        """The method's export of the backbone at scalar ``lam``, exit heads still inside."""
        if not isinstance(lam, (int, float)) or isinstance(lam, bool):
            raise ValueError(f"export needs one scalar λ in [0, 1], got {lam!r}")
        if not self.deterministic:
            raise ValueError(
                f"method {self.method_name!r} is configured to draw fresh noise every forward "
                "(resample); its function at a fixed λ is random and cannot be exported"
            )
        return self.method.export(self, float(lam))

    def _with_exits(self, backbone: nn.Module, exits: bool) -> nn.Module:
        """The folded ``backbone`` with its exit heads moved out (see :meth:`export`), checked
        to hold no conditioned module."""
        if self.exits is not None:
            backbone = export_exits(self.exits, backbone, keep=exits)
        left = [name for name in foreign_modules(backbone)
                if not (name == "<root>" and isinstance(backbone, MultiExitNet))]
        if left:
            raise RuntimeError(f"export left conditioned modules behind: {left[:5]}")
        return backbone

    def summary(self) -> str:
        """What the method conditioned, the parameter overhead over the plain backbone, the
        non-zero parameters of the exported model and whatever the method reports."""
        lines = [
            f"{type(self.backbone).__name__} ({self.backbone_name or 'custom'}) "
            f"conditioned with {self.method_name!r}: {len(self.replacements)} sites",
            summarize(self.replacements),
        ]
        try:  # at λ = 0, also for resampled noise (none is drawn there)
            plain = self.method.export(self, 0.0)
        except RuntimeError as err:  # e.g. masks still to be chosen from data
            lines.append(f"  export not possible yet: {err}")
        else:
            n_plain = sum(p.numel() for p in plain.parameters())
            n_total = sum(p.numel() for p in self.parameters())
            folded = count_nonzero(plain)
            lines += [
                f"  parameters: {n_total:,} vs {n_plain:,} plain (+{n_total - n_plain:,}, "
                f"{100.0 * (n_total - n_plain) / max(n_plain, 1):+.1f} %)",
                f"  non-zero parameters exported at λ = 0: {folded.nonzero:,} of "
                f"{folded.total:,} ({100.0 * folded.density:.1f} %)",
            ]
        return "\n".join(lines + self.method.report(self) + self.exits_report())

    def extra_repr(self) -> str:
        lam = self.lam if self.condition.is_scalar else "per-sample"
        return f"method={self.method_name!r}, lam={lam}"


_THRESHOLDS = "exit thresholds"
"""The served module's copy of the router's thresholds, among its targets (no state-dict name
has a space)."""


class _ServedModule:
    """The module the served export runs, kept from one key to the next so that a new key
    writes its folded tensors into it (``refresh``) instead of copying and folding the model
    again. A plain object, not a submodule: it is in no state dict, ``parameters()`` or
    deep copy of the model."""

    def __init__(self) -> None:
        self.clear()

    def clear(self, refreshable: bool = True) -> None:
        """Hold nothing. ``refreshable=False`` (after a mismatch): new modules of this model
        are not refreshed in place either, so an attack waits ``serve_after`` forwards
        instead of copying the model once per attack."""
        self.module: nn.Module | None = None
        self.targets: dict[str, torch.Tensor] = {}
        self.refreshable = refreshable

    def hold(self, module: nn.Module, targets: dict[str, torch.Tensor]) -> None:
        """Keep ``module``, whose tensors are ``targets`` under the names the folded backbone
        gives them (see :func:`~oat_plugins.surgery.folded_state`)."""
        self.module, self.targets = module, targets

    @torch.no_grad()
    def refresh(self, sources: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Write the tensors ``sources()`` gives (by target name) into the held module.
        False (and nothing held any more) when there is none or the tensors do not match,
        e.g. after a method's own export or a new head: then it is built afresh."""
        if self.module is None:
            return False
        state = sources()
        if state.keys() != self.targets.keys() or any(
                state[k].shape != t.shape or state[k].dtype != t.dtype
                for k, t in self.targets.items()):
            self.clear(refreshable=False)
            return False
        for name, target in self.targets.items():
            target.copy_(state[name])
        return True

    def __deepcopy__(self, memo: dict) -> _ServedModule:
        return _ServedModule()  # a copy of the model starts without one


class _HeldExport:
    """The served export of one key (λ, inference mode, parameters and buffers): how many
    forwards asked for it, and the module once built (None: not servable)."""

    def __init__(self) -> None:
        self.forwards = 0
        self.built = False
        self.module: nn.Module | None = None


def _cat_groups(outputs: list[Any], inverse: torch.Tensor) -> Any:
    """Concatenate per-λ-group outputs (tensors, or tuples/lists of tensors) along the batch
    and put them back in input order."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)[inverse]
    if isinstance(first, (tuple, list)):
        groups = zip(*outputs, strict=True)
        return type(first)(_cat_groups(list(parts), inverse) for parts in groups)
    raise TypeError(
        f"cannot regroup a per-sample λ forward that returns {type(first).__name__}; "
        "use a scalar λ"
    )


def _check_images(x: object, in_chans: int | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(
            "input must be a float tensor of images in [0, 1] with shape (N, C, H, W), got "
            + (f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__)
        )
    if x.dim() != 4 or (in_chans is not None and x.shape[1] != in_chans):
        raise ValueError(
            f"input must have shape (N, {in_chans or 'C'}, H, W), got {tuple(x.shape)}"
        )
    _check_range(x.detach())


def _check_range(x: torch.Tensor) -> None:
    """Warn (once) about values outside [0, 1]; refuse values far outside it whose mean is not
    that of images in [0, 1].

    Attacks legitimately query the model slightly off the image box (NI-FGSM's Nesterov look-
    ahead, VMI-FGSM's neighbours, SPSA's finite differences) or with noise added
    (randomised-smoothing PGD: N(0, 0.5²) reaches below -1 and above 2), so a wrapped model
    accepts what the backbone accepts. The common mistake this guards against is different:
    already-normalised images (mean ≈ 0, e.g. ImageNet-normalised values span [-2.1, 2.6])
    or 0–255 images (mean ≫ 1), which the model would normalise a second time.
    """
    lo, hi = torch.aminmax(x)
    if lo >= -_RANGE_TOLERANCE and hi <= 1 + _RANGE_TOLERANCE:
        return
    mean = float(x.float().mean())
    far = lo < _FAR_OUTSIDE[0] or hi > _FAR_OUTSIDE[1]
    if far and not _IMAGE_MEAN[0] <= mean <= _IMAGE_MEAN[1]:
        likely = "already-normalised images" if mean < _IMAGE_MEAN[0] else "0-255 images"
        raise ValueError(
            f"input values must be images in [0, 1] (got min {float(lo):.3g}, max "
            f"{float(hi):.3g}, mean {mean:.3g}: {likely}?); the model normalises internally, "
            "so pass unnormalised images in [0, 1] (or wrap with check_inputs=False)"
        )
    # A constant message: Python's default warning filter then shows it once.
    warnings.warn(
        "a conditional model got input values outside [0, 1]; they are accepted (attacks "
        "query slightly off the image box), but images should be in [0, 1] and not "
        "normalised: the model normalises internally",
        stacklevel=2,
    )


def _resolve_normalize(
    backbone: nn.Module, normalize: str | tuple | None
) -> tuple[Sequence[float], Sequence[float]] | None:
    if normalize is None:
        return None
    if normalize == "auto":
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        return (cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD))
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        mean, std = normalize
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("normalize=(mean, std) needs equal lengths and positive std")
        return tuple(mean), tuple(std)
    raise ValueError(f"normalize must be 'auto', (mean, std) or None, got {normalize!r}")


def wrap(
    backbone: nn.Module | str,
    method: str,
    *,
    normalize: str | tuple[Sequence[float], Sequence[float]] | None = "auto",
    model_kwargs: dict[str, Any] | None = None,
    check_inputs: bool = True,
    exits: str | list[int] | None = None,
    exit_weights: list[float] | None = None,
    **options: Any,
) -> ConditionalModel:
    """Turn a backbone into a :class:`ConditionalModel` by module surgery (in place).

    Args:
        backbone: a timm model (or any ``nn.Module``), or a timm model name, created with
            ``model_kwargs``. The module is modified in place, like PEFT's injection.
        method: a registered method name (see :func:`available_methods`).
        normalize: ``'auto'`` (mean/std of the backbone's ``pretrained_cfg``), a
            ``(mean, std)`` pair, or None when the backbone expects [0, 1] inputs.
        model_kwargs: keyword arguments of ``timm.create_model`` needed to rebuild the
            backbone on :func:`load` (num_classes, in_chans and a ViT's img_size are inferred).
            The backbone's architecture is recorded too, so a rebuild without kwargs that leave
            the state dict unchanged (``act_layer``, ``global_pool``, ...) is refused on load.
        check_inputs: validate that inputs are (N, C, H, W) float images. Values outside
            [0, 1] are accepted with a one-time warning (attacks query the model slightly off
            the image box, or with noise); values far outside it (below -1 or above 2) whose
            mean is not that of images in [0, 1] are a ``ValueError``: already-normalised or
            0-255 images.
        exits: early exits (RDI-Nets; see :mod:`oat_plugins.exits`): ``'auto'`` (after every
            stage but the last), a list of ``feature_info`` indices, or None (none; method
            ``'multiexit'`` has ``'auto'`` by default). Built before the method's surgery, so
            the method conditions the exit heads like the backbone.
        exit_weights: loss weight of each exit, the backbone's head last (default all 1).
        **options: the method's options; unknown ones raise a ``ValueError`` listing them.
    """
    if isinstance(backbone, str):
        backbone = timm.create_model(backbone, **(model_kwargs or {}))
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be an nn.Module or a timm model name, got {backbone!r}")
    method_obj = get_method(method)(**options)
    return ConditionalModel(
        backbone,
        method_obj,
        normalize=_resolve_normalize(backbone, normalize),
        backbone_spec=timm_spec(backbone, model_kwargs),  # before surgery
        check_inputs=check_inputs,
        exits=exits,
        exit_weights=exit_weights,
    )
