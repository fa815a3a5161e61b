"""``oat-plugins info``: the methods available, or what a model file holds."""

from __future__ import annotations

import argparse
import json
import os

import oat_plugins

from ..checkpoint import CHECKPOINT_FORMAT, describe_header, from_checkpoint, read_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="list the methods, or describe a model file",
        description="Without arguments, list the registered methods and their options. "
        "With --checkpoint, print the header of an oat-plugins model file (conditional model, "
        "training checkpoint, exported or GDWS-converted model) or the config of a "
        "timm-native export folder; for a conditional model, also what the method "
        "conditioned.",
    )
    parser.add_argument("--checkpoint", help="a file written by oat_plugins.save / train / "
                        "export / gdws, or an export --format safetensors folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.checkpoint:
        _describe(args.checkpoint)
        return 0
    for name in oat_plugins.available_methods():
        method = oat_plugins.get_method(name)
        doc = " ".join((method.__doc__ or "").split("\n\n")[0].split())
        print(f"{name}: {doc}")
    return 0


def _describe(path: str) -> None:
    if os.path.isdir(path):
        _describe_folder(path)
        return
    payload = read_checkpoint(path)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        payload = payload["model"]  # a training checkpoint
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{path!r} is not an oat-plugins model file")
    print("\n".join(describe_header(payload)))
    if payload.get("lam") is not None:
        print(f"λ: {payload['lam']}")
    if payload["format"] == CHECKPOINT_FORMAT:
        print(from_checkpoint(payload, source=repr(path)).summary())


def _describe_folder(path: str) -> None:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is a folder without config.json, not a timm-native export")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    cfg = config.get("pretrained_cfg", {})
    print(f"timm-native folder: {config.get('architecture')!r}, num_classes "
          f"{config.get('num_classes')}, model_args {config.get('model_args', {})}")
    print(f"input: size {cfg.get('input_size')}, mean {cfg.get('mean')}, std {cfg.get('std')}")
    print(f"oat_plugins: {config.get('oat_plugins', 'none')}")
