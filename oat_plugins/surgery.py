"""Module surgery in one place: find submodules by predicate, replace them, fold them back."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers.base import ConditionedModule, FoldableParametrization

Predicate = Callable[[str, nn.Module], bool]
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class Replacement:
    """One conditioned site: the qualified name, what was there and what the method did."""

    name: str
    original: str
    change: str


class NothingToConditionError(ValueError):
    """The backbone has no submodule the chosen method can condition."""


def find_modules(root: nn.Module, predicate: Predicate) -> list[tuple[str, nn.Module]]:
    """Named submodules matching ``predicate``, outermost first; descendants of a match are
    not visited (a match is treated as one unit)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if predicate(name, module):
            found.append((name, module))
    return found


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (works for Sequential/ModuleList indices)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def replace_modules(
    root: nn.Module,
    predicate: Predicate,
    factory: Callable[[str, nn.Module], nn.Module],
    change: str | Callable[[nn.Module], str],
) -> list[Replacement]:
    """Replace every submodule matching ``predicate`` by ``factory(name, module)``;
    ``change`` labels the replacement in the report (a string, or a function of the new
    module)."""
    done = []
    for name, module in find_modules(root, predicate):
        new = factory(name, module)
        set_submodule(root, name, new)
        label = change if isinstance(change, str) else change(new)
        done.append(Replacement(name, type(module).__name__, label))
    return done


def parametrize_weights(
    root: nn.Module,
    predicate: Predicate,
    factory: Callable[[str, nn.Module], nn.Module],
    change: str,
    tensor_name: str = "weight",
) -> list[Replacement]:
    """Register ``factory(name, module)`` as a parametrization of ``tensor_name`` on every
    matching submodule. The module keeps its class and forward (e.g. timm's Conv2dSame)."""
    done = []
    for name, module in find_modules(root, predicate):
        parametrize.register_parametrization(module, tensor_name, factory(name, module))
        done.append(Replacement(f"{name}.{tensor_name}", type(module).__name__, change))
    return done


def fold_conditioned(root: nn.Module) -> nn.Module:
    """Fold every conditioned piece of ``root`` in place at the condition's current scalar λ:
    conditioned modules are replaced by their ``fold()`` and our parametrizations
    (:class:`~oat_plugins.layers.FoldableParametrization`: weight noise, masks) are baked into
    plain parameters. Returns ``root``."""
    for name, module in find_modules(root, lambda _, m: isinstance(m, ConditionedModule)):
        set_submodule(root, name, module.fold())
    for module in list(root.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in list(module.parametrizations.items()):
            if any(isinstance(p, FoldableParametrization) for p in plist):
                _own_parametrized_class(module)
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return root


@torch.no_grad()
def folded_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict that :func:`fold_conditioned` gives a copy of ``root``, at the current
    scalar λ, without copying ``root``: each conditioned module folded on its own, each
    parametrized tensor read through its parametrizations (served by their fold caches), the
    other parameters and persistent buffers as they are. The served export refreshes its
    tensors from it."""
    state: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        if isinstance(module, ConditionedModule):
            state.update((prefix + k, v) for k, v in module.fold().state_dict().items())
            return
        parametrized = parametrize.is_parametrized(module)
        state.update((prefix + k, v) for k, v in module._parameters.items() if v is not None)
        state.update((prefix + k, v) for k, v in module._buffers.items()
                     if v is not None and k not in module._non_persistent_buffers_set)
        if parametrized:
            state.update((prefix + k, getattr(module, k)) for k in module.parametrizations)
        for name, child in module._modules.items():
            if child is not None and not (parametrized and name == "parametrizations"):
                visit(child, f"{prefix}{name}.")

    visit(root, "")
    return state


def _own_parametrized_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before removing a parametrization.

    torch's generated ``Parametrized<Cls>`` class is shared by ``copy.deepcopy`` replicas,
    and ``remove_parametrizations`` deletes the tensor's property from that class; folding a
    copy (as ``export`` does) would otherwise break the original model.
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def foreign_modules(root: nn.Module, package: str = "oat_plugins") -> list[str]:
    """Names of submodules whose class is defined in ``package`` (empty after a clean export)."""
    return [
        name or "<root>"
        for name, module in root.named_modules()
        if type(module).__module__.split(".")[0] == package
    ]


def summarize(replacements: list[Replacement]) -> str:
    """One line per (original type → change) with its count."""
    counts = Counter((r.original, r.change) for r in replacements)
    return "\n".join(f"  {n:4d} × {orig} → {change}" for (orig, change), n in counts.items())


def deepcopy_module(module: M) -> M:
    """``copy.deepcopy(module)`` that also works after a forward with autograd on.

    Some timm modules cache tensors computed from their parameters as plain attributes (e.g.
    the attention-bias caches of EfficientFormer, LeViT, TinyViT, filled by an eval-mode
    forward); made with grad enabled, such a tensor is not a graph leaf and ``deepcopy``
    refuses it. The copy gets a detached clone of each: the same value, no graph.
    """
    memo: dict[int, object] = {}
    for tensor in _attribute_tensors(module):
        if tensor.grad_fn is not None:
            memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(module, memo)


def _attribute_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors held by the submodules of ``module`` outside their parameters, buffers and
    children: plain attributes, also inside dicts, lists and tuples."""
    stack: list[object] = [
        value for m in module.modules() for key, value in vars(m).items()
        if key not in ("_parameters", "_buffers", "_modules")
    ]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
