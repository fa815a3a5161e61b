"""Base classes shared by every conditioned building block."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..condition import Condition

T = TypeVar("T")


class FoldCache(Generic[T]):
    """One value folded at a scalar λ, reused while neither λ nor any tensor it was computed
    from changed.

    A tensor counts as changed when its storage (``data_ptr``: ``.to()``, a dtype or device
    move) or its version counter (every in-place write: optimizer steps, ``load_state_dict``,
    ``copy_``) differs. Writes through ``.data`` bypass version counters; call
    ``model.clear_fold_caches()`` after such a write. Values made under
    ``torch.inference_mode`` are kept apart from the others (they cannot be saved for a
    backward pass). Computed under ``torch.no_grad``: a cached value carries no gradient to
    the tensors it came from.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key: tuple | None = None
        self._value: T | None = None

    def get(self, lam: float, sources: Iterable[torch.Tensor], compute: Callable[[], T]) -> T:
        key = (lam, torch.is_inference_mode_enabled(),
               *((t.data_ptr(), t._version) for t in sources))
        if key != self._key:
            with torch.no_grad():
                self._value = compute()
            self._key = key
        return self._value  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict) -> FoldCache[T]:
        return FoldCache()  # a copy starts empty: its tensors are new


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
