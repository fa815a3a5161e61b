"""``ConditionalModel``, ``wrap``, ``save`` and ``load``."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
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
from .condition import Condition, Lambda, lambda_groups
from .layers.base import ConditionedModule, FoldableParametrization, FoldCache
from .methods import Method, get_method
from .stats import count_nonzero
from .surgery import foreign_modules, summarize

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "oat-plugins/conditional-model"
CHECKPOINT_VERSION = 1
_RANGE_TOLERANCE = 1e-4


class ConditionalModel(nn.Module):
    """A backbone conditioned on λ ∈ [0, 1] (0: clean accuracy, 1: robustness).

    ``forward(x)`` takes one batch of images in [0, 1] of shape (N, C, H, W) and normalises
    internally, so attacks (torchattacks), RobustBench and timm code use it as an ordinary
    classifier. λ is set with :meth:`set_lambda`, or for a while with :meth:`at`. Build one
    with :func:`oat_plugins.wrap`. What the model does at each step is the method's (see
    :class:`~oat_plugins.Method`).
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
        self.condition = Condition()
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
        return self._run(lambda t: self.method.forward(self, t), self.prepare_inputs(x))

    def training_outputs(self, x: torch.Tensor) -> Any:
        """What the method's training loss needs for images ``x`` at the current λ (logits
        for most methods; see ``Method.training_forward``)."""
        return self._run(lambda t: self.method.training_forward(self, t), self.prepare_inputs(x))

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
        if self.backbone_spec is not None:
            self.backbone_spec["kwargs"]["num_classes"] = num_classes

    # -- export and reporting --------------------------------------------------------------
    def export(self, lam: float | None = None) -> nn.Module:
        """A standalone plain model computing this model's function at a fixed scalar λ.

        The method folds its conditioning (by default: dual norm → the chosen norm with FiLM
        folded in, weight parametrizations → plain weights), so the backbone keeps its own
        class; when the model normalises, the result is ``nn.Sequential(normalize,
        backbone)``. No oat_plugins module remains.
        """
        lam = self.condition.lam if lam is None else lam
        if not isinstance(lam, (int, float)) or isinstance(lam, bool):
            raise ValueError(f"export needs one scalar λ in [0, 1], got {lam!r}")
        if not self.deterministic:
            raise ValueError(
                f"method {self.method_name!r} is configured to draw fresh noise every forward "
                "(resample); its function at a fixed λ is random and cannot be exported"
            )
        backbone = self.method.export(self, float(lam))
        left = foreign_modules(backbone)
        if left:
            raise RuntimeError(f"export left conditioned modules behind: {left[:5]}")
        if self.normalize_stats is None:
            return backbone
        return nn.Sequential(Normalize(*self.normalize_stats), backbone)

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
        return "\n".join(lines + self.method.report(self))

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
    lo, hi = torch.aminmax(x.detach())
    if lo < -_RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
        raise ValueError(
            f"input values must be images in [0, 1] (got min {float(lo):.3g}, max "
            f"{float(hi):.3g}); the model normalises internally, so pass unnormalised images "
            "(or wrap with check_inputs=False)"
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
        if value is not None:
            kwargs[key] = tuple(int(s) for s in value)
    kwargs.update(model_kwargs or {})
    return {"name": name, "kwargs": kwargs}


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
        check_inputs: validate that inputs are (N, C, H, W) float images in [0, 1].
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
