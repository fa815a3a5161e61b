"""Model files: one header, one timm spec, one reader, and the conditional-model format.

Every oat-plugins model file is a dictionary read with ``torch.load(weights_only=True)`` that
starts with the same header (:func:`file_header`)::

    format, format_version, oat_plugins_version, timm_version, backbone, normalize, method

- ``oat-plugins/conditional-model``: a :class:`~oat_plugins.ConditionalModel` (:func:`save`,
  :func:`load`, here);
- ``oat-plugins/exported-model``: the plain model at one λ (:mod:`oat_plugins.exported`, which
  also writes the timm-native safetensors folder);
- ``oat-plugins/gdws-model``: a GDWS-converted plain model (:mod:`oat_plugins.gdws.io`).

``backbone`` is the *timm spec*, written by :func:`timm_spec` and read by
:func:`build_backbone`: ``name`` (timm architecture) and ``kwargs`` (its
``timm.create_model`` keyword arguments), plus since format_version 2 of the first two formats:

- ``architecture``: ``repr`` of the plain backbone when it was wrapped. Many timm kwargs
  (``act_layer``, ``global_pool``, ``drop_rate``, ...) leave the state dict unchanged, so a
  rebuild from incomplete kwargs would load without error and compute another function;
  comparing the rebuilt backbone's ``repr`` with this one turns that into a clear error.
- ``reset_classifier``: the calls of ``ConditionalModel.reset_classifier`` after wrapping,
  replayed in order on load (``kwargs`` stay those of ``create_model``).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.layers import SpaceToDepth
from torch import nn
from torchvision.transforms import Normalize

from ._io import atomic_torch_save
from ._version import __version__
from .methods import get_method

if TYPE_CHECKING:
    from .model import ConditionalModel

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "oat-plugins/conditional-model"
CHECKPOINT_VERSION = 2  # 2: the spec records the architecture and classifier resets

_KWARGS_HINT = (
    "pass the timm.create_model kwargs it was built with as model_kwargs={...}, or the "
    "backbone itself as backbone=<nn.Module built the same way>"
)

NormalizeStats = tuple[tuple[float, ...], tuple[float, ...]]


# -- the timm spec -------------------------------------------------------------------------------
def in_chans_of(backbone: nn.Module) -> int | None:
    """Input channels of ``backbone``: those of its timm ``first_conv``, else of its first
    ``Conv2d``, before any space-to-depth stem."""
    first = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
    try:
        conv = backbone.get_submodule(first) if isinstance(first, str) else None
    except AttributeError:
        conv = None
    if conv is None:
        conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    channels = getattr(conv, "in_channels", None)
    # TResNet's stem moves 4×4 pixel blocks into channels before its first conv (3 -> 48)
    space_to_depth = next((m for m in backbone.modules() if isinstance(m, SpaceToDepth)), None)
    if channels is not None and space_to_depth is not None:
        channels //= space_to_depth.bs**2
    return channels


def architecture_text(backbone: nn.Module) -> str:
    """What identifies a plain backbone's function beyond its state dict: its ``repr`` (layer
    types, activations, pooling, norm eps, ...) and the string ``global_pool`` settings that
    ViT-style heads keep outside any module."""
    pools = [
        f"{name or '<model>'}.global_pool = {module.global_pool!r}"
        for name, module in backbone.named_modules()
        if isinstance(getattr(module, "global_pool", None), str)
    ]
    return "\n".join([repr(backbone), *pools])


def timm_spec(
    backbone: nn.Module,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    record_architecture: bool = True,
) -> dict[str, Any] | None:
    """How to rebuild a plain timm ``backbone`` with ``timm.create_model``, or None when it is
    not a named timm model.

    ``num_classes``, ``in_chans`` and a ViT's ``img_size``/``patch_size`` are inferred;
    ``model_kwargs`` (the kwargs it was created with) take precedence. ``record_architecture``
    stores :func:`architecture_text` for the check on load; call it on the backbone before any
    surgery.
    """
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture")
    if name is None:
        return None
    kwargs: dict[str, Any] = {}
    if hasattr(backbone, "num_classes"):
        kwargs["num_classes"] = int(backbone.num_classes)
    in_chans = in_chans_of(backbone)
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    # timm's ViT-style models take the token grid from these; the state dict depends on it.
    patch_embed = getattr(backbone, "patch_embed", None)
    for key in ("img_size", "patch_size"):
        value = getattr(patch_embed, key, None)
        takes, default = _argument_default(type(backbone), key)
        if not takes:  # e.g. EfficientViT (MSRA): no patch_size
            continue
        if isinstance(value, int):  # e.g. XCiT keeps an int
            kwargs[key] = value
        elif value is not None:
            value = tuple(int(s) for s in value)
            # NesT computes img_size % patch_size: an int argument gets its int back
            square = len(set(value)) == 1
            kwargs[key] = value[0] if square and isinstance(default, int) else value
    kwargs.update(model_kwargs or {})
    spec: dict[str, Any] = {"name": name, "kwargs": kwargs}
    if record_architecture:
        spec["architecture"] = architecture_text(backbone)
    return spec


def _argument_default(cls: type, name: str) -> tuple[bool, Any]:
    """(whether ``cls(...)`` accepts the keyword argument ``name``, its default or None)."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return True, None
    if name in params:
        return True, params[name].default
    return any(p.kind is p.VAR_KEYWORD for p in params.values()), None


def with_model_kwargs(
    spec: dict[str, Any] | None, model_kwargs: Mapping[str, Any] | None, source: str
) -> dict[str, Any] | None:
    """``spec`` with ``model_kwargs`` added to its ``create_model`` kwargs (a copy)."""
    if not model_kwargs:
        return copy.deepcopy(spec)
    if spec is None or not spec.get("name"):
        raise ValueError(
            f"{source} was saved from a backbone that is not a named timm model, so "
            "model_kwargs cannot rebuild it; pass the backbone itself"
        )
    spec = copy.deepcopy(spec)
    spec["kwargs"] = {**spec["kwargs"], **model_kwargs}
    return spec


def note_reset_classifier(
    spec: dict[str, Any] | None, num_classes: int, *args: Any, **kwargs: Any
) -> None:
    """Record a ``reset_classifier`` call in ``spec`` so that :func:`replay_resets` repeats it
    on load (``global_pool`` and the like leave no trace in the state dict)."""
    if spec is not None:
        spec.setdefault("reset_classifier", []).append(
            {"num_classes": int(num_classes), "args": list(args), "kwargs": dict(kwargs)}
        )


def replay_resets(model: nn.Module, spec: dict[str, Any] | None) -> None:
    """Repeat the ``reset_classifier`` calls recorded in ``spec`` on ``model``."""
    for call in (spec or {}).get("reset_classifier", []):
        model.reset_classifier(call["num_classes"], *call["args"], **call["kwargs"])


def without_resets(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of ``spec`` before its recorded ``reset_classifier`` calls."""
    if spec is None:
        return None
    return {k: copy.deepcopy(v) for k, v in spec.items() if k != "reset_classifier"}


def check_architecture(
    spec: dict[str, Any] | None,
    backbone: nn.Module,
    *,
    source: str,
    timm_version: str | None = None,
    hint: str = _KWARGS_HINT,
) -> None:
    """Refuse a plain ``backbone`` whose architecture differs from the one ``spec`` recorded
    (a file without a record passes). When the file was written under another timm version
    the difference may be timm's printing only, so it is logged instead."""
    expected = (spec or {}).get("architecture")
    if expected is None:
        return
    found = architecture_text(backbone)
    if found == expected:
        return
    saved_line, built_line = _first_difference(expected, found)
    message = (
        f"{source}: the backbone built for it differs from the saved architecture (saved "
        f"{saved_line!r}, built {built_line!r}), although its state dict may fit; {hint}"
    )
    if timm_version is not None and timm_version != timm.__version__:
        logger.warning("%s (the file was written with timm %s, this is timm %s)", message,
                       timm_version, timm.__version__)
        return
    raise ValueError(message)


def _first_difference(a: str, b: str) -> tuple[str, str]:
    lines_a, lines_b = a.splitlines(), b.splitlines()
    for line_a, line_b in zip(lines_a, lines_b, strict=False):
        if line_a != line_b:
            return line_a.strip(), line_b.strip()
    n = min(len(lines_a), len(lines_b))
    return ("\n".join(lines_a[n:n + 1]).strip() or "<end>",
            "\n".join(lines_b[n:n + 1]).strip() or "<end>")


def build_backbone(
    spec: dict[str, Any] | None,
    *,
    source: str,
    timm_version: str | None = None,
    hint: str = _KWARGS_HINT,
) -> nn.Module:
    """``timm.create_model`` from ``spec`` (randomly initialised, before any recorded
    ``reset_classifier``), checked against the recorded architecture."""
    if spec is None or not spec.get("name"):
        raise ValueError(
            f"{source} was saved from a backbone that is not a named timm model; pass the "
            "backbone itself (backbone=<an identical freshly built nn.Module>)"
        )
    # The weights come from the file: never download (kwargs may hold pretrained=True).
    backbone = timm.create_model(spec["name"], **{**spec["kwargs"], "pretrained": False})
    check_architecture(spec, backbone, source=source, timm_version=timm_version, hint=hint)
    return backbone


# -- normalisation -------------------------------------------------------------------------------
def normalize_field(stats: NormalizeStats | None) -> dict[str, list[float]] | None:
    """The header's ``normalize`` entry for ``(mean, std)`` (None: no normalisation)."""
    return None if stats is None else {"mean": list(stats[0]), "std": list(stats[1])}


def split_normalize(model: nn.Module) -> tuple[NormalizeStats | None, nn.Module]:
    """``(mean, std), core`` of ``nn.Sequential(torchvision Normalize, core)`` (what
    ``ConditionalModel.export`` returns for a normalising model); ``None, model`` otherwise."""
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize):
        mean, std = (tuple(float(v) for v in torch.as_tensor(s).flatten())
                     for s in (model[0].mean, model[0].std))
        return (mean, std), model[1]
    return None, model


def attach_normalize(core: nn.Module, field: Mapping[str, Sequence[float]] | None) -> nn.Module:
    """``core``, behind a ``Normalize`` in an ``nn.Sequential`` when ``field`` holds one."""
    if field is None:
        return core
    return nn.Sequential(Normalize(field["mean"], field["std"]), core)


# -- header, reading and loading weights -----------------------------------------------------------
def file_header(
    fmt: str,
    version: int,
    *,
    backbone: dict[str, Any] | None,
    normalize: NormalizeStats | None,
    method: str | None,
) -> dict[str, Any]:
    """The fields every oat-plugins model file starts with: format, versions, and what
    rebuilds the backbone (timm spec, normalisation, conditioning method)."""
    return {
        "format": fmt,
        "format_version": version,
        "oat_plugins_version": __version__,
        "timm_version": timm.__version__,
        "backbone": copy.deepcopy(backbone),
        "normalize": normalize_field(normalize),
        "method": method,
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


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
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


def load_weights(
    module: nn.Module, state_dict: Mapping[str, Any], *, source: str, what: str
) -> nn.Module:
    """Move ``module`` to the device ``torch.load``'s ``map_location`` put ``state_dict`` on
    (any form: a string, a device, a dict, a callable) and load it, strictly."""
    device = next((t.device for t in state_dict.values() if isinstance(t, torch.Tensor)),
                  torch.device("cpu"))
    module.to(device)
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(
            f"{source} does not match {what} (was it built with other timm.create_model "
            f"kwargs? pass them as model_kwargs=...): {str(err)[:500]}"
        ) from None
    return module


# -- the conditional-model format ---------------------------------------------------------------
def to_checkpoint(model: ConditionalModel) -> dict[str, Any]:
    """Everything needed to rebuild ``model``, as plain tensors and JSON-like values."""
    from .model import ConditionalModel  # model.py imports this module

    if not isinstance(model, ConditionalModel):
        raise ValueError(f"expected a ConditionalModel, got {type(model).__name__}")
    lam = model.lam
    header = file_header(CHECKPOINT_FORMAT, CHECKPOINT_VERSION, backbone=model.backbone_spec,
                         normalize=model.normalize_stats, method=model.method_name)
    return {
        **header,
        "options": model.method.options_dict(),
        "check_inputs": model.check_inputs,
        "lam": lam if isinstance(lam, float) else lam.cpu(),
        "exits": None if model.exits is None else model.exits.spec.to_dict(),
        "state_dict": model.state_dict(),
    }


def from_checkpoint(
    payload: dict[str, Any],
    *,
    method: str | None = None,
    backbone: nn.Module | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    source: str = "checkpoint",
) -> ConditionalModel:
    """Rebuild a model from :func:`to_checkpoint`'s dictionary (or a training checkpoint
    holding one under ``'model'``), in eval mode, on the device of its tensors."""
    from .model import ConditionalModel  # model.py imports this module

    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]
    check_header(payload, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, source,
                 "conditional-model checkpoint")
    if method is not None and payload["method"] != method:
        raise ValueError(f"{source} holds a {payload['method']!r} model, not a {method!r} one")
    spec = with_model_kwargs(payload["backbone"], model_kwargs, source)
    timm_version = payload.get("timm_version")
    if backbone is None:
        backbone = build_backbone(spec, source=source, timm_version=timm_version)
    else:
        check_architecture(spec, backbone, source=source, timm_version=timm_version)
    norm = payload["normalize"]
    model = ConditionalModel(
        backbone,
        get_method(payload["method"])(**payload["options"]),
        normalize=None if norm is None else (norm["mean"], norm["std"]),
        backbone_spec=without_resets(spec),
        check_inputs=payload.get("check_inputs", True),
        exits=payload.get("exits"),
    )
    replay_resets(model, spec)  # on the wrapped model, like the original: the new head is plain
    load_weights(model, payload["state_dict"], source=source,
                 what=f"the rebuilt {payload['method']!r} model")
    model.set_lambda(payload["lam"])
    return model.eval()


def save(model: ConditionalModel, path: str | os.PathLike) -> None:
    """Write ``model`` to one file (atomically) that :func:`load` rebuilds it from."""
    atomic_torch_save(to_checkpoint(model), path)


def load(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    method: str | None = None,
    backbone: nn.Module | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> ConditionalModel:
    """Rebuild a model written by :func:`save` (or a training checkpoint holding one under
    ``'model'``), in eval mode (call ``.train()`` to fine-tune it).

    Args:
        path: the file.
        map_location: as in :func:`torch.load`; the model is returned on the device its
            weights were mapped to (e.g. ``"cuda"``).
        method: make a checkpoint of another method an error.
        backbone: the plain backbone, built as it was before wrapping, when it is not a named
            timm model (or was built with kwargs the file does not record).
        model_kwargs: ``timm.create_model`` kwargs the file does not record (e.g.
            ``{"act_layer": "gelu"}`` for a backbone wrapped as a module). A backbone that
            differs from the saved architecture is refused with an error naming these options.
    """
    return from_checkpoint(
        read_checkpoint(path, map_location),
        method=method,
        backbone=backbone,
        model_kwargs=model_kwargs,
        source=repr(os.fspath(path)),
    )


def describe_header(payload: Mapping[str, Any]) -> list[str]:
    """Readable lines for a model file's common header (what ``oat-plugins info`` prints)."""
    spec = payload.get("backbone")
    norm = payload.get("normalize")
    lines = [
        f"format: {payload.get('format')} version {payload.get('format_version', 0)}, written "
        f"by oat-plugins {payload.get('oat_plugins_version', '?')} "
        f"(timm {payload.get('timm_version', '?')})",
        "backbone: " + ("not a named timm model" if not spec else
                        f"timm {spec['name']!r} with {spec['kwargs']}"
                        + ("" if "architecture" in spec else " (no architecture record)")),
        "normalize: " + ("none" if norm is None else f"mean {norm['mean']}, std {norm['std']}"),
    ]
    for call in (spec or {}).get("reset_classifier", []):
        lines.append(f"reset_classifier: {call}")
    if payload.get("method") is not None:
        lines.append(f"method: {payload['method']}")
    return lines
