"""Plain models exported at a fixed λ, saved as weights only, in two formats.

``ConditionalModel.export(λ)`` returns a plain timm model (preceded by its normaliser). Pickling
that ``nn.Module`` would need ``torch.load(weights_only=False)``, which executes arbitrary code
from the file. :func:`save_exported` therefore writes only tensors and JSON-like values:

- ``format="oat"`` (default): one file with the folded backbone's ``state_dict`` and the common
  header of :mod:`oat_plugins.checkpoint` (timm spec, normalisation); :func:`load_exported`
  rebuilds it under ``torch.load(weights_only=True)``.
- ``format="safetensors"``: a folder in the Hugging Face Hub layout timm's ``push_to_hub``
  writes (``model.safetensors`` + ``config.json``), which plain timm loads without
  oat-plugins (see docs/export.md). timm models take normalised inputs; ``config.json``'s
  ``pretrained_cfg`` holds the mean/std, so timm's data config normalises.

>>> oat_plugins.save_exported(model, 0.5, "resnet_lam0.5.pt")
>>> plain = oat_plugins.load_exported("resnet_lam0.5.pt")   # nn.Sequential(Normalize, ResNet)
>>> oat_plugins.save_exported(model, 0.5, "resnet_lam0.5", format="safetensors")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import timm
from timm.models._pretrained import filter_pretrained_cfg
from torch import nn

from ._io import atomic_torch_save, atomic_write_bytes, atomic_write_text
from ._version import __version__
from .checkpoint import (
    architecture_text,
    attach_normalize,
    build_backbone,
    check_architecture,
    check_header,
    file_header,
    in_chans_of,
    load_weights,
    read_checkpoint,
    replay_resets,
    split_normalize,
    with_model_kwargs,
)
from .condition import validate_lambda
from .model import ConditionalModel

EXPORT_FORMAT = "oat-plugins/exported-model"
EXPORT_VERSION = 2  # 2: the spec records the architecture and classifier resets
TIMM_FOLDER_FORMAT = "oat-plugins/timm-folder"
TIMM_FOLDER_VERSION = 1
FORMATS = ("oat", "safetensors")


def _exported_backbone(model: ConditionalModel, lam: float) -> tuple[float, nn.Module]:
    """The validated λ and the folded plain backbone (without its normaliser) at it."""
    if not isinstance(model, ConditionalModel):
        raise ValueError(f"expected a ConditionalModel, got {type(model).__name__}")
    lam = validate_lambda(lam, per_sample=False)
    if model.exits is not None:
        raise ValueError(
            "a model with exits exports as a multi-exit model (heads and router), which the "
            "weights-only export files do not hold; save the conditional model with "
            "oat_plugins.save (thresholds included), or export the backbone alone in Python "
            "with model.export(λ, exits=False)"
        )
    if model.backbone_spec is None:
        raise ValueError(
            "this model's backbone is not a named timm model, so a weights-only export could "
            "not be rebuilt; use model.export(λ) in Python and save it yourself"
        )
    return lam, split_normalize(model.export(lam))[1]


def exported_payload(model: ConditionalModel, lam: float) -> dict[str, Any]:
    """The weights-only dictionary :func:`save_exported` writes for ``model`` at ``lam``."""
    lam, backbone = _exported_backbone(model, lam)
    header = file_header(EXPORT_FORMAT, EXPORT_VERSION, backbone=model.backbone_spec,
                         normalize=model.normalize_stats, method=model.method_name)
    return {
        **header,
        "lam": lam,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
    }


def save_exported(
    model: ConditionalModel,
    lam: float,
    path: str | os.PathLike,
    *,
    format: Literal["oat", "safetensors"] = "oat",  # noqa: A002 (the name users expect)
    image_size: int | tuple[int, int] | None = None,
) -> None:
    """Export ``model`` at ``lam`` and write it (atomically, file by file).

    ``format="oat"``: one weights-only file that :func:`load_exported` rebuilds.
    ``format="safetensors"``: ``path`` is a folder that receives ``model.safetensors`` and
    ``config.json`` in timm's Hugging Face Hub layout, loadable by plain timm (see
    :func:`timm_config` and docs/export.md); ``image_size`` is the input size timm's data
    config should use (e.g. 32 for CIFAR; default: a ViT's ``img_size``, else timm's default
    for the architecture).
    """
    if format == "oat":
        if image_size is not None:
            raise ValueError("image_size applies to format='safetensors' only")
        atomic_torch_save(exported_payload(model, lam), path)
    elif format == "safetensors":
        _save_timm_folder(model, lam, Path(path), image_size)
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")


def is_exported(payload: object) -> bool:
    """Whether a loaded checkpoint dictionary is an exported plain model."""
    return isinstance(payload, dict) and payload.get("format") == EXPORT_FORMAT


def from_exported(
    payload: dict[str, Any],
    *,
    source: str = "file",
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Rebuild the plain model from :func:`exported_payload`'s dictionary, on the device of
    its tensors."""
    check_header(payload, EXPORT_FORMAT, EXPORT_VERSION, source, "exported model")
    spec = with_model_kwargs(payload["backbone"], model_kwargs, source)
    backbone = build_backbone(spec, source=source, timm_version=payload.get("timm_version"),
                              hint="pass the timm.create_model kwargs it was built with as "
                              "model_kwargs={...}")
    replay_resets(backbone, spec)
    load_weights(backbone, payload["state_dict"], source=source,
                 what=f"timm's {spec['name']!r} built with {spec['kwargs']}")
    return attach_normalize(backbone, payload["normalize"]).eval()


def load_exported(
    path: str | os.PathLike,
    *,
    map_location: Any = "cpu",
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Rebuild a plain model written by :func:`save_exported` (or ``oat-plugins export``).

    Returns the timm backbone, preceded by a ``Normalize`` in an ``nn.Sequential`` when the
    conditional model normalised its inputs, so it takes [0, 1] images like the original, on
    the device ``map_location`` maps the weights to. The file is read with
    ``torch.load(weights_only=True)``. ``model_kwargs``: ``timm.create_model`` kwargs the file
    does not record (a backbone that differs from the saved architecture is refused)."""
    payload = read_checkpoint(path, map_location)
    return from_exported(payload, source=repr(os.fspath(path)), model_kwargs=model_kwargs)


def exported_lambda(path: str | os.PathLike) -> float:
    """The λ a file written by :func:`save_exported` was exported at."""
    payload = read_checkpoint(path)
    if not is_exported(payload):
        raise ValueError(f"{os.fspath(path)!r} is not an oat-plugins exported model")
    return float(payload["lam"])


# -- the timm-native folder -----------------------------------------------------------------------
def timm_config(
    model: ConditionalModel,
    lam: float,
    backbone: nn.Module,
    image_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``config.json`` of the timm-native folder, in timm's ``save_for_hf`` layout.

    ``architecture``, ``num_classes``, ``model_args`` (the other ``create_model`` kwargs, with
    the ``global_pool`` of any ``reset_classifier``) and ``pretrained_cfg`` (the backbone's,
    with this model's input mean/std — zeros and ones when it takes [0, 1] inputs as they
    are, and ``image_size`` as its input size without resizing or cropping), plus an
    ``oat_plugins`` entry (format, version, λ, method). ``backbone`` is the folded plain
    backbone at ``lam``.
    """
    spec = model.backbone_spec
    # Where the weights come from is the folder's business, not a model argument.
    model_args = {k: v for k, v in spec["kwargs"].items()
                  if k not in ("num_classes", "pretrained", "pretrained_cfg",
                               "pretrained_cfg_overlay")}
    for call in spec.get("reset_classifier", []):
        pool = call["kwargs"].get("global_pool", call["args"][0] if call["args"] else None)
        if pool is not None:
            model_args["global_pool"] = pool
    channels = in_chans_of(backbone) or 3
    mean, std = model.normalize_stats or ((0.0,) * channels, (1.0,) * channels)
    pretrained_cfg = filter_pretrained_cfg(backbone.pretrained_cfg, remove_source=True)
    pretrained_cfg.pop("architecture", None)
    # The weights are a plain state dict (not, e.g., a ViT's .npz needing its custom loader).
    pretrained_cfg.update(mean=list(mean), std=list(std), num_classes=backbone.num_classes,
                          custom_load=False)
    image_size = model_args.get("img_size") if image_size is None else image_size
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        # The size the model was trained at, used as is: no resize-and-crop margin.
        pretrained_cfg.update(input_size=[channels, int(height), int(width)], crop_pct=1.0)
        for key in ("test_input_size", "test_crop_pct", "min_input_size"):
            pretrained_cfg.pop(key, None)
    config = {
        "architecture": spec["name"],
        "num_classes": backbone.num_classes,
        "num_features": getattr(backbone, "num_features", None),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "oat_plugins": {"format": TIMM_FOLDER_FORMAT, "format_version": TIMM_FOLDER_VERSION,
                        "version": __version__, "timm_version": timm.__version__,
                        "lambda": lam, "method": model.method_name},
    }
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError) as err:
        raise ValueError(f"timm's config.json cannot hold this model's create_model kwargs "
                         f"{model_args}: {err}") from None


def _save_timm_folder(
    model: ConditionalModel, lam: float, folder: Path, image_size: int | tuple[int, int] | None
) -> None:
    lam, backbone = _exported_backbone(model, lam)
    config = timm_config(model, lam, backbone, image_size)
    _check_timm_rebuilds(config, backbone)
    # safetensors refuses tensors that share memory; plain copies have none.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt"}),
                       folder / "model.safetensors")
    atomic_write_text(json.dumps(config, indent=2) + "\n", folder / "config.json")


def _check_timm_rebuilds(config: dict[str, Any], backbone: nn.Module) -> None:
    """Refuse to write a folder from which plain timm would build another network."""
    rebuilt = timm.create_model(config["architecture"], pretrained=False,
                                num_classes=config["num_classes"], **config["model_args"])
    check_architecture(
        {"architecture": architecture_text(backbone)}, rebuilt, source="config.json",
        hint="wrap the backbone with model_kwargs naming every timm.create_model kwarg it was "
        "built with",
    )
