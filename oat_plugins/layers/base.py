"""Base classes shared by every conditioned building block."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..condition import Condition

T = TypeVar("T")


class FoldCache(Generic[T]):
    """One value folded at a scalar λ (or any other hashable ``key``), reused while neither
    the key nor any tensor it was computed from changed.

    A source tensor counts as unchanged only when it is the same tensor object (the cache
    holds it, so its ``id`` cannot be reused by a new tensor meanwhile), with the same storage
    (``data_ptr``: ``.to()``, a dtype or device move change it) and the same version counter
    (every in-place write: optimizer steps, ``load_state_dict``, ``copy_``). A source may
    therefore be the value another cache serves (a parametrization chain), but a tensor made
    afresh each forward never hits. Writes through ``.data`` bypass version counters; call
    ``model.clear_fold_caches()`` after such a write. Inference tensors have no version
    counter: they match by object and storage (their only in-place writers would be ours).
    Values made under ``torch.inference_mode`` are kept apart from the others (they cannot be
    saved for a backward pass). Computed under ``torch.no_grad``: a cached value carries no
    gradient to the tensors it came from.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key: tuple | None = None
        self._held: tuple[torch.Tensor, ...] = ()
        self._value: T | None = None
        self._slots: list[tuple[dict, str]] | None = None

    def get(self, key: Hashable, sources: Sequence[torch.Tensor], compute: Callable[[], T], *,
            module: nn.Module | None = None) -> T:
        """The cached value for ``key`` and ``sources`` (plus every parameter and buffer of
        ``module``), or ``compute()`` (under no_grad)."""
        if module is not None:
            sources = [*sources, *self._tensors_of(module)]
        full_key = (key, torch.is_inference_mode_enabled(), _signature(sources))
        if full_key != self._key:
            with torch.no_grad():
                self._value = compute()
            self._key, self._held = full_key, tuple(sources)
        return self._value  # type: ignore[return-value]

    def _tensors_of(self, module: nn.Module) -> list[torch.Tensor]:
        # Where each parameter and buffer lives (its module's own dict and name) is found
        # once, not by a walk of the module tree every forward; a tensor assigned anew under
        # that name is still seen. clear() finds them again (after adding tensors).
        if self._slots is None:
            self._slots = [(table, name) for sub in module.modules()
                           for table in (sub._parameters, sub._buffers)
                           for name, tensor in table.items() if tensor is not None]
        return [table[name] for table, name in self._slots]

    def __deepcopy__(self, memo: dict) -> FoldCache[T]:
        return FoldCache()  # a copy starts empty: its tensors are new


def _signature(sources: Sequence[torch.Tensor]) -> tuple:
    """(object, storage, version) of each tensor: one flat tuple, compared in C."""
    try:
        return tuple([(id(t), t.data_ptr(), t._version) for t in sources])
    except RuntimeError:  # an inference tensor has no version counter
        return tuple([(id(t), t.data_ptr(), -1 if t.is_inference() else t._version)
                      for t in sources])


class ConditionedModule(nn.Module):
    """A module that reads the shared :class:`~oat_plugins.condition.Condition`.

    Subclasses implement :meth:`fold`, which returns a plain torch/timm module computing the
    same function at the current scalar λ; ``ConditionalModel.export`` calls it.
    """

    def __init__(self, condition: Condition) -> None:
        super().__init__()
        # A plain attribute, not a submodule: every layer shares the model's one Condition.
        self.condition = condition

    def fold(self) -> nn.Module:
        raise NotImplementedError


class FoldableParametrization(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization of this package that export bakes
    into a plain weight (``remove_parametrizations(..., leave_parametrized=True)``).

    Registered on a weight, it keeps the module's own class and forward (timm's conv
    subclasses stay intact). ``deterministic`` is False when the parametrization draws fresh
    randomness per forward; such a model cannot be exported.
    """

    deterministic: bool = True


class ConditionedParametrization(FoldableParametrization):
    """A foldable parametrization that reads the shared condition (e.g. FLOAT's weight
    noise). Export folds it at a scalar λ."""

    def __init__(self, condition: Condition) -> None:
        super().__init__()
        self.condition = condition


P = TypeVar("P", bound=nn.Module)


def parametrizations_of(root: nn.Module, kind: type[P]) -> list[tuple[nn.Module, str, P]]:
    """(module, tensor name, parametrization) for every parametrization of type ``kind``
    registered under ``root``."""
    found: list[tuple[nn.Module, str, P]] = []
    for module in root.modules():
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                found += [(module, tensor_name, p) for p in plist if isinstance(p, kind)]
    return found
