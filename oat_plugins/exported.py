"""Plain models exported at a fixed λ, saved as weights only.

``ConditionalModel.export(λ)`` returns a plain timm model (preceded by its normaliser). Pickling
that ``nn.Module`` would need ``torch.load(weights_only=False)``, which executes arbitrary code
from the file. :func:`save_exported` therefore writes only tensors and JSON-like values — the
folded backbone's ``state_dict``, its timm spec (``name`` + ``create_model`` kwargs) and the
normalisation — and :func:`load_exported` rebuilds it with ``timm.create_model`` +
``load_state_dict`` under ``torch.load(weights_only=True)``.

>>> oat_plugins.save_exported(model, 0.5, "resnet_lam0.5.pt")
>>> plain = oat_plugins.load_exported("resnet_lam0.5.pt")   # nn.Sequential(Normalize, ResNet)
"""

from __future__ import annotations

import os
from typing import Any

import timm
from torch import nn
from torchvision.transforms import Normalize

from ._io import atomic_torch_save
from .condition import validate_lambda
from .model import ConditionalModel, check_header, file_header, read_checkpoint

EXPORT_FORMAT = "oat-plugins/exported-model"
EXPORT_VERSION = 1


def exported_payload(model: ConditionalModel, lam: float) -> dict[str, Any]:
    """The weights-only dictionary :func:`save_exported` writes for ``model`` at ``lam``."""
    if not isinstance(model, ConditionalModel):
        raise ValueError(f"expected a ConditionalModel, got {type(model).__name__}")
    lam = validate_lambda(lam, per_sample=False)
    if model.backbone_spec is None:
        raise ValueError(
            "this model's backbone is not a named timm model, so a weights-only export could "
            "not be rebuilt; use model.export(λ) in Python and save it yourself"
        )
    plain = model.export(lam)
    backbone = plain[-1] if isinstance(plain, nn.Sequential) and model.normalize_stats else plain
    return {
        **file_header(model, EXPORT_FORMAT, EXPORT_VERSION),
        "lam": lam,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }


def save_exported(model: ConditionalModel, lam: float, path: str | os.PathLike) -> None:
    """Export ``model`` at ``lam`` and write it (atomically) as a weights-only file that
    :func:`load_exported` rebuilds."""
    atomic_torch_save(exported_payload(model, lam), path)


def is_exported(payload: object) -> bool:
    """Whether a loaded checkpoint dictionary is an exported plain model."""
    return isinstance(payload, dict) and payload.get("format") == EXPORT_FORMAT


def from_exported(payload: dict[str, Any], *, source: str = "file") -> nn.Module:
    """Rebuild the plain model from :func:`exported_payload`'s dictionary."""
    check_header(payload, EXPORT_FORMAT, EXPORT_VERSION, source, "exported model")
    spec = payload["backbone"]
    backbone = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    try:
        backbone.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(
            f"{source} does not match timm's {spec['name']!r} built with {spec['kwargs']}: "
            f"{str(err)[:500]}"
        ) from None
    backbone.eval()
    norm = payload["normalize"]
    if norm is None:
        return backbone
    return nn.Sequential(Normalize(norm["mean"], norm["std"]), backbone).eval()


def load_exported(path: str | os.PathLike, *, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a plain model written by :func:`save_exported` (or ``oat-plugins export``).

    Returns the timm backbone, preceded by a ``Normalize`` in an ``nn.Sequential`` when the
    conditional model normalised its inputs, so it takes [0, 1] images like the original. The
    file is read with ``torch.load(weights_only=True)``."""
    payload = read_checkpoint(path, map_location)
    return from_exported(payload, source=repr(os.fspath(path)))


def exported_lambda(path: str | os.PathLike) -> float:
    """The λ a file written by :func:`save_exported` was exported at."""
    payload = read_checkpoint(path)
    if not is_exported(payload):
        raise ValueError(f"{os.fspath(path)!r} is not an oat-plugins exported model")
    return float(payload["lam"])
