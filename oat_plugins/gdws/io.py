"""MAC counting and ``weights_only``-safe storage of GDWS-converted models."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._io import atomic_torch_save
from ..model import read_checkpoint
from .layer import GDWSConv2d

__all__ = ["FORMAT", "count_macs", "load_converted", "save_converted", "source_spec"]

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


def source_spec(model: nn.Module) -> dict[str, Any] | None:
    """How to rebuild the (unconverted) architecture of ``model`` with timm, or None.

    Understands a timm model and ``nn.Sequential(torchvision Normalize, timm model)`` (what
    ``ConditionalModel.export`` returns for a normalising model).
    """
    from torchvision.transforms import Normalize

    norm = None
    core = model
    if isinstance(model, nn.Sequential) and len(model) == 2 and isinstance(model[0], Normalize):
        norm = {
            "mean": [float(v) for v in torch.as_tensor(model[0].mean).flatten()],
            "std": [float(v) for v in torch.as_tensor(model[0].std).flatten()],
        }
        core = model[1]
    cfg = getattr(core, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not arch:
        return None
    kwargs: dict[str, Any] = {}
    nc = getattr(core, "num_classes", None)
    if isinstance(nc, int):
        kwargs["num_classes"] = nc
    first = next((m for m in core.modules() if isinstance(m, (nn.Conv2d, GDWSConv2d))), None)
    if first is not None and first.in_channels != 3:
        kwargs["in_chans"] = int(first.in_channels)
    return {"arch": arch, "kwargs": kwargs, "normalize": norm}


def save_converted(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save a converted model so that :func:`load_converted` rebuilds it with
    ``torch.load(weights_only=True)`` (no pickled classes). Written atomically.

    Stored: ``format``; ``source`` = how to rebuild the unconverted architecture (timm ``arch``,
    its ``kwargs``, and the ``normalize`` mean/std when the model is
    ``nn.Sequential(Normalize, timm model)``, as exported by ``ConditionalModel.export``),
    inferred by :func:`source_spec` unless ``arch``/``model_kwargs`` are given; the constructor
    config of every :class:`GDWSConv2d` by module name; the ``state_dict``; and ``extra``
    (plain data only, e.g. the report or beta).
    """
    spec = source_spec(model) or {"arch": None, "kwargs": {}, "normalize": None}
    if arch is not None:
        spec["arch"] = arch
    if model_kwargs is not None:
        spec["kwargs"] = dict(model_kwargs)
    layers = {n: m.config() for n, m in model.named_modules() if isinstance(m, GDWSConv2d)}
    payload = {
        "format": FORMAT,
        "source": spec,
        "gdws_layers": layers,
        "state_dict": model.state_dict(),
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)
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
            ``timm.create_model(arch, pretrained=False, **kwargs)`` from the file's ``source``,
            behind a torchvision ``Normalize`` if one was saved; pass ``build`` for anything
            else.
        map_location: as in :func:`torch.load`.
    """
    payload = read_checkpoint(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a file written by save_converted ({FORMAT})")
    src = payload["source"]
    if build is None:
        if not src["arch"]:
            raise ValueError(
                f"{path} stores no timm architecture name; pass build=<factory of the source "
                "model>"
            )
        import timm

        model = timm.create_model(src["arch"], pretrained=False, **src["kwargs"])
        if src.get("normalize"):
            from torchvision.transforms import Normalize

            norm = src["normalize"]
            model = nn.Sequential(Normalize(norm["mean"], norm["std"]), model)
    else:
        model = build()
    for name, cfg in payload["gdws_layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GDWSConv2d(**cfg))
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()
