"""``ConditionalModel``, ``wrap``, ``save`` and ``load``."""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():
    # torchvision 0.29 (also imported by timm) uses torch.jit.interface, deprecated in
    # torch 2.14: noise for our users.
    warnings.filterwarnings("ignore", message=".*torch.jit.interface", category=FutureWarning)
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision.transforms import Normalize

from ._io import atomic_torch_save
from ._version import __version__
from .condition import Condition, Lambda
from .layers.base import ConditionedModule, FoldableParametrization
from .methods import Method, get_method
from .stats import count_nonzero, masked_density
from .surgery import deepcopy_module, fold_conditioned, foreign_modules, summarize

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "oat-plugins/conditional-model"
CHECKPOINT_VERSION = 1
_RANGE_TOLERANCE = 1e-4
_FAR_OUTSIDE = (-1.0, 2.0)
"""Inputs beyond these bounds are refused unless their mean is that of images (see below)."""
_IMAGE_MEAN = (0.3, 0.9)
"""Mean of a batch of images in [0, 1] (natural images: about 0.45), also with zero-mean noise
added by an attack; normalised images have a mean near 0 (ImageNet-normalised uniform noise:
0.23), 0-255 images far above 1."""


class ConditionalModel(nn.Module):
    """A backbone conditioned on λ ∈ [0, 1] (0: clean accuracy, 1: robustness).

    ``forward(x)`` takes one batch of images in [0, 1] of shape (N, C, H, W) and normalises
    internally, so attacks (torchattacks), RobustBench and timm code use it as an ordinary
    classifier. λ is set with :meth:`set_lambda` or :func:`oat_plugins.condition`. Build one
    with :func:`oat_plugins.wrap`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: Method,
        *,
        normalize: tuple[Sequence[float], Sequence[float]] | None,
        backbone_spec: dict[str, Any] | None = None,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        if any(isinstance(m, (ConditionedModule, FoldableParametrization))
               for m in backbone.modules()):
            raise ValueError("this backbone is already conditioned; wrap a plain model")
        self.method = method
        self.condition = Condition(per_sample=method.per_sample)
        self.extras = nn.ModuleDict()
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
        logger.info("wrapped %s with %r:\n%s", type(backbone).__name__, method.name,
                    summarize(self.replacements))

    # -- the condition -------------------------------------------------------------------
    @property
    def lam(self) -> Lambda:
        """The current λ: a float, or a (N,) tensor for per-sample conditioning."""
        return self.condition.lam

    def set_lambda(self, lam: object) -> ConditionalModel:
        """Set λ: a float in [0, 1] or (if the method allows) a tensor of shape (N,)."""
        self.condition.lam = lam
        return self

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
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
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
        lam = self.condition.lam
        values = torch.unique(lam)
        if values.numel() == 1:
            with self.condition.scalar(float(values[0])):
                return fn(x)
        lam = lam.to(x.device)
        index, outputs = [], []
        for value in values.tolist():
            idx = torch.nonzero(lam == value, as_tuple=True)[0]
            with self.condition.scalar(value):
                outputs.append(fn(x[idx]))
            index.append(idx)
        inverse = torch.argsort(torch.cat(index))
        return _cat_groups(outputs, inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(self.backbone, self._prepare(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` on [0, 1] images, at the current λ."""
        return self._run(self.backbone.forward_features, self._prepare(x))

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
        if self.backbone_spec is not None:
            self.backbone_spec["kwargs"]["num_classes"] = num_classes

    # -- export and reporting --------------------------------------------------------------
    def export(self, lam: float | None = None) -> nn.Module:
        """A standalone plain model computing this model's function at a fixed scalar λ.

        The backbone keeps its own class with every conditioned piece folded (dual norm → the
        chosen norm with FiLM folded in, weight parametrizations → plain weights); when the
        model normalises, the result is ``nn.Sequential(normalize, backbone)``. No
        oat_plugins module remains, and the parameter count is the backbone's.
        """
        lam = self.condition.lam if lam is None else lam
        if not isinstance(lam, (int, float)) or isinstance(lam, bool):
            raise ValueError(f"export needs one scalar λ in [0, 1], got {lam!r}")
        if not self.deterministic:
            raise ValueError(
                f"method {self.method_name!r} is configured to draw fresh noise every forward "
                "(resample); its function at a fixed λ is random and cannot be exported"
            )
        backbone = self._folded_backbone(lam)
        left = foreign_modules(backbone)
        if left:
            raise RuntimeError(f"export left conditioned modules behind: {left[:5]}")
        if self.normalize_stats is None:
            return backbone
        return nn.Sequential(Normalize(*self.normalize_stats), backbone)

    def _folded_backbone(self, lam: float) -> nn.Module:
        """A copy of the backbone with every conditioned piece folded at scalar ``lam``."""
        with torch.no_grad():
            copied = deepcopy_module(self)
            copied.set_lambda(lam)
            return fold_conditioned(copied.backbone)

    def summary(self) -> str:
        """What the method conditioned, the parameter overhead over the backbone and, for
        masked (sparse) models, the non-zero parameter counts."""
        plain = self._folded_backbone(0.0)  # at λ = 0 also for resampled noise (none drawn)
        n_plain = sum(p.numel() for p in plain.parameters())
        n_total = sum(p.numel() for p in self.parameters())
        lines = [
            f"{type(self.backbone).__name__} ({self.backbone_name or 'custom'}) "
            f"conditioned with {self.method_name!r}: {len(self.replacements)} sites",
            summarize(self.replacements),
            f"  parameters: {n_total:,} vs {n_plain:,} plain "
            f"(+{n_total - n_plain:,}, {100.0 * (n_total - n_plain) / max(n_plain, 1):+.1f} %)",
        ]
        kept = masked_density(self)
        if kept is not None:
            ours, folded = count_nonzero(self), count_nonzero(plain)
            lines.append(
                f"  non-zero parameters: {ours.nonzero:,} of {ours.total:,} "
                f"({100.0 * ours.density:.1f} %); exported: {folded.nonzero:,} of "
                f"{folded.total:,} ({100.0 * folded.density:.1f} %); masked weights kept: "
                f"{100.0 * kept:.1f} %"
            )
        return "\n".join(lines)

    def extra_repr(self) -> str:
        lam = self.lam if self.condition.is_scalar else "per-sample"
        return f"method={self.method_name!r}, lam={lam}"


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


def _in_chans(backbone: nn.Module) -> int | None:
    first = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
    try:
        conv = backbone.get_submodule(first) if isinstance(first, str) else None
    except AttributeError:
        conv = None
    if conv is None:
        conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return getattr(conv, "in_channels", None)


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


def _backbone_spec(backbone: nn.Module, model_kwargs: dict[str, Any] | None) -> dict | None:
    """What :func:`load` needs to rebuild the backbone with ``timm.create_model``."""
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if name is None:
        return None
    kwargs: dict[str, Any] = {}
    if hasattr(backbone, "num_classes"):
        kwargs["num_classes"] = int(backbone.num_classes)
    in_chans = _in_chans(backbone)
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    # timm's ViT-style models take the token grid from these; the state dict depends on it.
    patch_embed = getattr(backbone, "patch_embed", None)
    for key in ("img_size", "patch_size"):
        value = getattr(patch_embed, key, None)
        if not _takes_argument(type(backbone), key):  # e.g. EfficientViT (MSRA): no patch_size
            continue
        if isinstance(value, int):  # e.g. XCiT keeps an int
            kwargs[key] = value
        elif value is not None:
            kwargs[key] = tuple(int(s) for s in value)
    kwargs.update(model_kwargs or {})
    return {"name": name, "kwargs": kwargs}


def _takes_argument(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` accepts the keyword argument ``name``."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def wrap(
    backbone: nn.Module | str,
    method: str,
    *,
    normalize: str | tuple[Sequence[float], Sequence[float]] | None = "auto",
    model_kwargs: dict[str, Any] | None = None,
    check_inputs: bool = True,
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
        check_inputs: validate that inputs are (N, C, H, W) float images. Values outside
            [0, 1] are accepted with a one-time warning (attacks query the model slightly off
            the image box, or with noise); values far outside it (below -1 or above 2) whose
            mean is not that of images in [0, 1] are a ``ValueError``: already-normalised or
            0-255 images.
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
        backbone_spec=_backbone_spec(backbone, model_kwargs),
        check_inputs=check_inputs,
    )


def file_header(model: ConditionalModel, fmt: str, version: int) -> dict[str, Any]:
    """The fields every oat-plugins file of a model starts with: format, versions, and what
    rebuilds the backbone (timm spec, normalisation, method name)."""
    stats = model.normalize_stats
    return {
        "format": fmt,
        "format_version": version,
        "oat_plugins_version": __version__,
        "backbone": model.backbone_spec,
        "normalize": None if stats is None else {"mean": list(stats[0]), "std": list(stats[1])},
        "method": model.method_name,
    }


def check_header(payload: object, fmt: str, version: int, source: str, kind: str) -> None:
    """Raise a clear ``ValueError`` unless ``payload`` is a ``fmt`` file this version reads."""
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{source} is not an oat-plugins {kind}")
    if payload.get("format_version", 0) > version:
        raise ValueError(
            f"{source} has {kind} format {payload['format_version']}, newer than this "
            f"oat-plugins ({__version__}) reads ({version}); upgrade oat-plugins"
        )


def to_checkpoint(model: ConditionalModel) -> dict[str, Any]:
    """Everything needed to rebuild ``model``, as plain tensors and JSON-like values."""
    if not isinstance(model, ConditionalModel):
        raise ValueError(f"expected a ConditionalModel, got {type(model).__name__}")
    lam = model.lam
    return {
        **file_header(model, CHECKPOINT_FORMAT, CHECKPOINT_VERSION),
        "options": model.method.options_dict(),
        "check_inputs": model.check_inputs,
        "lam": lam if isinstance(lam, float) else lam.cpu(),
        "state_dict": model.state_dict(),
    }


def from_checkpoint(
    payload: dict[str, Any],
    *,
    method: str | None = None,
    backbone: nn.Module | None = None,
    source: str = "checkpoint",
) -> ConditionalModel:
    """Rebuild a model from :func:`to_checkpoint`'s dictionary (or a training checkpoint
    holding one under ``'model'``), in eval mode."""
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]
    check_header(payload, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, source,
                 "conditional-model checkpoint")
    if method is not None and payload["method"] != method:
        raise ValueError(
            f"{source} holds a {payload['method']!r} model, not a {method!r} one"
        )
    if backbone is None:
        spec = payload["backbone"]
        if spec is None:
            raise ValueError(
                f"{source} was saved from a backbone that is not a named timm model; pass "
                "load(..., backbone=<an identical freshly built nn.Module>)"
            )
        backbone = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    norm = payload["normalize"]
    model = ConditionalModel(
        backbone,
        get_method(payload["method"])(**payload["options"]),
        normalize=None if norm is None else (norm["mean"], norm["std"]),
        backbone_spec=payload["backbone"],
        check_inputs=payload.get("check_inputs", True),
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(
            f"{source} does not match the rebuilt {payload['method']!r} model (was it saved "
            "with other timm model kwargs? pass them as wrap(..., model_kwargs=...)): "
            f"{str(err)[:500]}"
        ) from None
    model.set_lambda(payload["lam"])
    return model.eval()


def save(model: ConditionalModel, path: str | os.PathLike) -> None:
    """Write ``model`` to one file (atomically) that :func:`load` rebuilds it from."""
    atomic_torch_save(to_checkpoint(model), path)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a clear error for a bad file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {os.fspath(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as err:
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable checkpoint (corrupt, truncated, or not "
            f"written by torch.save): {err}"
        ) from None


def load(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    method: str | None = None,
    backbone: nn.Module | None = None,
) -> ConditionalModel:
    """Rebuild a model written by :func:`save` (or a training checkpoint holding one under
    ``'model'``), in eval mode (call ``.train()`` to fine-tune it). ``method`` makes a
    checkpoint of another method an error; ``backbone`` supplies the architecture when it is
    not a named timm model."""
    return from_checkpoint(
        read_checkpoint(path, map_location),
        method=method,
        backbone=backbone,
        source=repr(os.fspath(path)),
    )
