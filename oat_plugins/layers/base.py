"""Base classes shared by every conditioned building block."""

from __future__ import annotations

from torch import nn

from ..condition import Condition


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
