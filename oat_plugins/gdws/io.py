"""MAC counting and ``weights_only``-safe storage of GDWS-converted models.

The file starts with the header every oat-plugins model file shares
(:mod:`oat_plugins.checkpoint`): the ``backbone`` timm spec is that of the *unconverted*
architecture, which :func:`load_converted` builds before putting the ``GDWSConv2d`` layers in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._device import model_device
from .._io import atomic_torch_save
from ..checkpoint import (
    attach_normalize,
    build_backbone,
    check_header,
    file_header,
    load_weights,
    read_checkpoint,
    replay_resets,
    split_normalize,
    timm_spec,
    with_model_kwargs,
)
from .layer import GDWSConv2d

__all__ = ["FORMAT", "FORMAT_VERSION", "count_macs", "load_converted", "save_converted"]

logger = logging.getLogger(__name__)

FORMAT = "oat-plugins/gdws-model"
FORMAT_VERSION = 1
LEGACY_FORMAT = "oat_plugins.gdws.converted/1"  # before the common header; still read


def count_macs(model: nn.Module, example: torch.Tensor | Sequence[int]) -> int:
    """Multiply-accumulates of one forward of ``model`` on ``example``.

    Counts ``nn.Conv2d`` (``out_pixels * C*Kh*Kw*M/groups``), :class:`GDWSConv2d`
    (``out_pixels * macs_per_pixel``) and ``nn.Linear``; other ops (norms, activations, pooling)
    are ignored. ``example`` is an input tensor or its shape (then zeros on the model's device).
    """
    if not isinstance(example, torch.Tensor):
        example = torch.zeros(*example, device=model_device(model))
    total = [0]

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, GDWSConv2d):
            total[0] += out.shape[0] * out.shape[2] * out.shape[3] * mod.macs_per_pixel
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            per_px = mod.in_channels * kh * kw * mod.out_channels // mod.groups
            total[0] += out.shape[0] * out.shape[2] * out.shape[3] * per_px
        elif isinstance(mod, nn.Linear):
            total[0] += out.numel() * mod.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (GDWSConv2d, nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


def save_converted(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    spec: dict[str, Any] | None = None,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save a converted model so that :func:`load_converted` rebuilds it with
    ``torch.load(weights_only=True)`` (no pickled classes). Written atomically.

    Args:
        model: the converted model: a timm model, or ``nn.Sequential(Normalize, timm model)``
            as exported by ``ConditionalModel.export`` (the normalisation is stored).
        spec: the timm spec of the source (unconverted) architecture: a conditional model's
            ``backbone_spec``, or :func:`oat_plugins.checkpoint.timm_spec` of the plain model
            taken before conversion. Default: inferred from ``model`` (``num_classes``,
            ``in_chans``, a ViT's token grid) plus ``model_kwargs``, without the architecture
            check; pass ``spec`` for a backbone built with other ``create_model`` kwargs.
        arch: the timm architecture name, when ``model`` does not carry it.
        model_kwargs: ``timm.create_model`` kwargs added to the spec.
        extra: plain data stored alongside (e.g. the report or beta).
    """
    stats, core = split_normalize(model)
    if spec is None:
        # The converted model's repr is not the source architecture's: no architecture record.
        spec = timm_spec(core, record_architecture=False)
        if arch is not None:
            spec = {"name": arch, "kwargs": {**(spec or {}).get("kwargs", {})}}
    spec = with_model_kwargs(spec, model_kwargs, repr(os.fspath(path)))
    layers = {n: m.config() for n, m in model.named_modules() if isinstance(m, GDWSConv2d)}
    payload = {
        **file_header(FORMAT, FORMAT_VERSION, backbone=spec, normalize=stats, method=None),
        "gdws_layers": layers,
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)
    logger.info("saved GDWS model (%d GDWS layers) to %s", len(layers), path)


def _upgrade_legacy(payload: Any) -> Any:
    """A file of the format before the common header, in the current layout."""
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        return payload
    src = payload["source"]
    spec = {"name": src["arch"], "kwargs": dict(src["kwargs"])} if src.get("arch") else None
    return {"format": FORMAT, "format_version": 0, "backbone": spec,
            "normalize": src.get("normalize"), "method": None,
            **{k: payload[k] for k in ("gdws_layers", "state_dict", "extra")}}


def load_converted(
    path: str | os.PathLike[str],
    build: Callable[[], nn.Module] | None = None,
    map_location: Any = "cpu",
    *,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_converted` (``weights_only=True``), in eval mode.

    Args:
        path: the file.
        build: zero-argument factory for the source (unconverted) architecture. Default:
            ``timm.create_model(name, pretrained=False, **kwargs)`` from the file's timm spec
            (checked against the recorded architecture), behind a torchvision ``Normalize``
            if one was saved; pass ``build`` for anything else.
        map_location: as in :func:`torch.load`; the model is returned on the device the
            weights were mapped to.
        model_kwargs: ``timm.create_model`` kwargs the file does not record.
    """
    source = repr(os.fspath(path))
    payload = _upgrade_legacy(read_checkpoint(path, map_location))
    check_header(payload, FORMAT, FORMAT_VERSION, source, "GDWS-converted model")
    if build is None:
        spec = with_model_kwargs(payload["backbone"], model_kwargs, source)
        if spec is None:
            raise ValueError(f"{source} stores no timm architecture name; pass "
                             "build=<factory of the source model>")
        core = build_backbone(spec, source=source, timm_version=payload.get("timm_version"),
                              hint="pass the timm.create_model kwargs it was built with as "
                              "model_kwargs={...}, or build=<factory of the source model>")
        replay_resets(core, spec)
        model = attach_normalize(core, payload["normalize"])
    else:
        model = build()
    for name, cfg in payload["gdws_layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GDWSConv2d(**cfg))
    load_weights(model, payload["state_dict"], source=source,
                 what="the rebuilt GDWS-converted model")
    return model.eval()
