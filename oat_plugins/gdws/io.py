"""MAC counting and ``weights_only``-safe storage of GDWS-converted models."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .layer import GDWSConv2d

__all__ = ["FORMAT", "count_macs", "load_converted", "save_converted"]

logger = logging.getLogger(__name__)

FORMAT = "oat_plugins.gdws.converted/1"


def count_macs(model: nn.Module, example: torch.Tensor | Sequence[int]) -> int:
    """Multiply-accumulates of one forward of ``model`` on ``example``.

    Counts ``nn.Conv2d`` (``out_pixels * C*Kh*Kw*M/groups``), :class:`GDWSConv2d`
    (``out_pixels * macs_per_pixel``) and ``nn.Linear``; other ops (norms, activations, pooling)
    are ignored. ``example`` is an input tensor or its shape (then zeros on the model's device).
    """
    if not isinstance(example, torch.Tensor):
        try:
            dev = next(model.parameters()).device
        except StopIteration:
            dev = torch.device("cpu")
        example = torch.zeros(*example, device=dev)
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


def _default_arch(model: nn.Module) -> tuple[str | None, dict[str, Any]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    kwargs: dict[str, Any] = {}
    nc = getattr(model, "num_classes", None)
    if isinstance(nc, int):
        kwargs["num_classes"] = nc
    return arch, kwargs


def save_converted(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save a converted model so that :func:`load_converted` rebuilds it with
    ``torch.load(weights_only=True)`` (no pickled classes).

    Stored: ``format``, the timm ``arch`` name and ``model_kwargs`` to rebuild the source model
    (defaults: ``model.pretrained_cfg['architecture']`` and ``num_classes``), the constructor
    config of every :class:`GDWSConv2d` by module name, the ``state_dict``, and ``extra``
    (plain data only, e.g. the report or beta).
    """
    d_arch, d_kwargs = _default_arch(model)
    layers = {n: m.config() for n, m in model.named_modules() if isinstance(m, GDWSConv2d)}
    payload = {
        "format": FORMAT,
        "arch": arch if arch is not None else d_arch,
        "model_kwargs": dict(model_kwargs) if model_kwargs is not None else d_kwargs,
        "gdws_layers": layers,
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    torch.save(payload, path)
    logger.info("saved GDWS model (%d GDWS layers) to %s", len(layers), path)


def load_converted(
    path: str | os.PathLike[str],
    build: Callable[[], nn.Module] | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model saved by :func:`save_converted` (``weights_only=True``), in eval mode.

    Args:
        path: the file.
        build: zero-argument factory for the source (unconverted) architecture. Default:
            ``timm.create_model(arch, pretrained=False, **model_kwargs)`` from the file; pass
            ``build`` when the model is not a bare timm model (e.g. it has a wrapper).
        map_location: as in :func:`torch.load`.
    """
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a file written by save_converted ({FORMAT})")
    if build is None:
        if not payload["arch"]:
            raise ValueError(
                f"{path} stores no timm architecture name; pass build=<factory of the source "
                "model>"
            )
        import timm

        model = timm.create_model(payload["arch"], pretrained=False, **payload["model_kwargs"])
    else:
        model = build()
    for name, cfg in payload["gdws_layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GDWSConv2d(**cfg))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()
