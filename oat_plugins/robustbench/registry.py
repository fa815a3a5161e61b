"""Register an oat-plugins model at a fixed λ under a RobustBench name.

After ``register(name, checkpoint, lam, dataset, threat_model)``:

* ``robustbench.utils.load_model(name, dataset=..., threat_model=...)`` returns the model,
  without any download: robustbench first asks timm for a model named
  ``<name lower, '-'→'_'>_<dataset>_<threat lower>`` and that name is registered with timm;
* ``timm.create_model(<that timm name>)`` builds the same model;
* ``robustbench.model_zoo.model_dicts[dataset][threat_model][name]`` lists it (so tools that
  enumerate the zoo see it), with ``gdrive_id=None``. Where RobustBench has no zoo for the
  pair (CIFAR-100 L2), an empty one is added and removed again by :func:`unregister`.

Each build returns a fresh model (the checkpoint is loaded again, or an in-memory model is
deep-copied) at that λ, in eval mode; by default a conditional model is exported to a plain
timm/torch model with ``model.export(lam)``. ``pretrained`` is ignored: a registered name
always means the trained checkpoint.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._device import model_device
from . import _timm_entrypoints
from .entries import check_dataset, check_threat_model, entry_id
from .protocol import _is_conditional, _load_checkpoint, check_lambda, prepare_model

__all__ = ["register", "unregister", "registered", "timm_name"]


@dataclass(frozen=True)
class _Registration:
    name: str
    dataset: str
    threat_model: str
    lam: float | None
    path: Path | None
    module: nn.Module | None
    export: bool

    def build(self) -> nn.Module:
        if self.path is not None:
            model = _load_checkpoint(self.path)
        else:
            model = copy.deepcopy(self.module)
        model = prepare_model(model, self.lam)
        if self.export and self.lam is not None and hasattr(model, "export"):
            model = model.export(self.lam).eval()
        return model


_REGISTERED: dict[str, _Registration] = {}  # timm name -> registration
_CREATED_ZOOS: set[tuple[str, str]] = set()  # (dataset, threat) dicts added to model_dicts


def timm_name(name: str, dataset: str, threat_model: str) -> str:
    """The timm model name robustbench's ``load_model`` looks up for this RobustBench name."""
    return (f"{name.lower().replace('-', '_')}_{check_dataset(dataset)}_"
            f"{check_threat_model(threat_model).lower()}")


def _entrypoint(tname: str, reg: _Registration) -> Any:
    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        num_classes = kwargs.pop("num_classes", None)
        if kwargs:
            raise TypeError(f"{tname} is a registered checkpoint and takes no model options, "
                            f"got {sorted(kwargs)}")
        model = reg.build()
        if num_classes is not None:
            device = model_device(model)
            with torch.no_grad():
                out = model(torch.zeros(1, 3, 32, 32, device=device))
            if out.shape[-1] != num_classes:
                raise ValueError(f"{tname} has {out.shape[-1]} classes, asked for {num_classes}")
        return model

    create.__name__ = tname
    create.__qualname__ = tname
    create.__module__ = _timm_entrypoints.__name__
    create.__doc__ = (f"oat-plugins model {reg.name!r} at λ={reg.lam} for {reg.dataset} "
                      f"{reg.threat_model} (registered by oat_plugins.robustbench.register).")
    return create


def _model_dicts() -> Any:
    from . import compat

    compat.install()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts, BenchmarkDataset, ThreatModel


def register(
    name: str,
    checkpoint: str | os.PathLike | nn.Module,
    lam: float | None = None,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    *,
    export: bool = True,
) -> str:
    """Make ``robustbench.utils.load_model(name, dataset=, threat_model=)`` return this model.

    Args:
        name: the RobustBench model name (letters, digits, '_' and '-').
        checkpoint: a checkpoint file (loaded with ``oat_plugins.load`` at each build) or a
            model object (deep-copied at each build).
        lam: the condition in [0, 1] (required for a conditional model, None for a plain one).
        dataset: ``"cifar10"`` or ``"cifar100"``.
        threat_model: ``"Linf"`` or ``"L2"``.
        export: return ``model.export(lam)`` (a plain model) rather than the conditional model.

    Returns:
        The timm model name, also usable with ``timm.create_model``.

    Raises:
        ValueError: bad name, dataset, threat model or λ, or a name already taken by a
            RobustBench or timm model. Registering the same name again replaces our entry.
    """
    import timm
    from timm.models import register_model

    dataset = check_dataset(dataset)
    threat_model = check_threat_model(threat_model)
    entry_id(name, None)  # validates the characters
    if lam is not None:
        lam = check_lambda(lam)
    path: Path | None = None
    module: nn.Module | None = None
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    elif isinstance(checkpoint, nn.Module):
        module = checkpoint
        if _is_conditional(module) and lam is None:
            raise ValueError("a conditional model needs lam= (a λ in [0, 1])")
        if not _is_conditional(module) and lam is not None:
            raise ValueError(f"lam={lam!r} given but {type(module).__name__} is not conditional")
    else:
        raise TypeError("checkpoint must be a path or an nn.Module, got "
                        f"{type(checkpoint).__name__}")

    tname = timm_name(name, dataset, threat_model)
    if tname not in _REGISTERED and timm.is_model(tname):
        raise ValueError(f"timm already has a model named {tname!r}; choose another name")
    model_dicts, BenchmarkDataset, ThreatModel = _model_dicts()
    zoos = model_dicts[BenchmarkDataset(dataset)]
    if ThreatModel(threat_model) not in zoos:  # e.g. cifar100/L2: RobustBench has no zoo
        zoos[ThreatModel(threat_model)] = OrderedDict()
        _CREATED_ZOOS.add((dataset, threat_model))
    zoo = zoos[ThreatModel(threat_model)]
    if name in zoo and tname not in _REGISTERED:
        raise ValueError(f"RobustBench already has a {dataset}/{threat_model} model named "
                         f"{name!r}; choose another name")

    reg = _Registration(name, dataset, threat_model, lam, path, module, export)
    if path is not None:
        reg.build()  # fail now, not inside robustbench, if the checkpoint is unusable
    fn = _entrypoint(tname, reg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Overwriting {tname} in registry")
        register_model(fn)
    setattr(sys.modules[_timm_entrypoints.__name__], tname, fn)
    zoo[name] = {"model": reg.build, "gdrive_id": None, "preprocessing": None}
    _REGISTERED[tname] = reg
    return tname


def unregister(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> None:
    """Remove a name added by :func:`register` from timm and robustbench (KeyError if absent)."""
    from timm.models import _registry

    tname = timm_name(name, dataset, threat_model)
    if tname not in _REGISTERED:
        raise KeyError(f"{name!r} ({dataset}, {threat_model}) was not registered here")
    reg = _REGISTERED.pop(tname)
    # timm has no public unregister; these are the maps register_model fills.
    module_key = _timm_entrypoints.__name__.split(".")[-1]
    _registry._model_entrypoints.pop(tname, None)
    _registry._model_to_module.pop(tname, None)
    _registry._module_to_models[module_key].discard(tname)
    if tname in _timm_entrypoints.__all__:
        _timm_entrypoints.__all__.remove(tname)
    if hasattr(_timm_entrypoints, tname):
        delattr(_timm_entrypoints, tname)
    model_dicts, BenchmarkDataset, ThreatModel = _model_dicts()
    zoos = model_dicts[BenchmarkDataset(reg.dataset)]
    zoos[ThreatModel(reg.threat_model)].pop(reg.name, None)
    key = (reg.dataset, reg.threat_model)
    if key in _CREATED_ZOOS and not zoos[ThreatModel(reg.threat_model)]:
        del zoos[ThreatModel(reg.threat_model)]
        _CREATED_ZOOS.discard(key)


def registered() -> dict[str, tuple[str, str, str, float | None]]:
    """The names registered in this process: timm name → (name, dataset, threat, λ)."""
    return {t: (r.name, r.dataset, r.threat_model, r.lam) for t, r in _REGISTERED.items()}

