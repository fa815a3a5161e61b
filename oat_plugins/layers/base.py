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


class ConditionedParametrization(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization that reads the shared condition.

    Registered on a weight, it keeps the module's own class and forward (timm's conv
    subclasses stay intact). Export folds it with
    ``parametrize.remove_parametrizations(..., leave_parametrized=True)`` at a scalar λ.
    ``deterministic`` is False when the parametrization draws fresh randomness per forward.
    """

    deterministic: bool = True

    def __init__(self, condition: Condition) -> None:
        super().__init__()
        self.condition = condition
