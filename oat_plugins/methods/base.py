"""The method contract and the registry that ``wrap`` looks methods up in.

A method is one module holding one :class:`Method` subclass, registered by name. It declares,
with defaults for what it does not need (in the spirit of PEFT's ``BaseTuner``: inject,
create-and-replace, unload-and-merge):

1. surgery: :meth:`Method.apply` conditions the backbone in place;
2. data-driven set-up before training: :meth:`Method.prepare` (e.g. saliency masks);
3. forward: :meth:`Method.forward` (inference) and :meth:`Method.training_forward`;
4. loss: :meth:`Method.training_loss` sees a :class:`~oat_plugins.losses.LossContext`;
5. export: :meth:`Method.export` folds back to a plain module at a fixed λ;
6. compute knobs set after training: :meth:`Method.set_density` (masked methods);
7. report: :meth:`Method.report` adds lines to ``model.summary()``;
8. λ sampling: :meth:`Method.default_sampler` and :meth:`Method.check_sampler`.

Adding a method touches no core file: see ``docs/adding-a-method.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..condition import Condition
from ..losses import LossContext, Stats, oat_loss_terms
from ..samplers import LambdaSampler
from ..surgery import Replacement, deepcopy_module, fold_conditioned

if TYPE_CHECKING:
    from ..model import ConditionalModel

_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """A conditioning method: one subclass per module, registered with
    :func:`register_method`.

    A subclass declares ``name`` and an ``Options`` dataclass (its keyword options, all
    JSON-friendly so they round-trip through a checkpoint) and implements :meth:`apply` and
    :meth:`default_sampler`; every other hook has a default that suits layer- and
    weight-level conditioning.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    lambda_groups: ClassVar[bool] = False
    """Serve a per-sample λ by one forward per distinct λ value (for methods whose weights
    depend on λ: one batched convolution cannot give each sample its own weight). The model
    puts the groups' outputs back in input order."""
    identity_at_zero: ClassVar[bool] = False
    """Freshly wrapped, the model computes the backbone's function at λ = 0 (checked by the
    contract tests)."""
    default_exits: ClassVar[str | None] = None
    """The ``exits`` a model of this method gets when ``wrap`` is given none (see
    :mod:`oat_plugins.exits`): None for conditioning methods, ``'auto'`` for ``multiexit``."""

    def __init__(self, **options: Any) -> None:
        fields = {f.name: f for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            allowed = ", ".join(f"{n}={_default(f)!r}" for n, f in fields.items())
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; "
                f"allowed options (with defaults): {allowed}"
            )
        self.options = self.Options(**options)

    # -- 1. surgery ------------------------------------------------------------------------
    def apply(
        self, backbone: nn.Module, condition: Condition, extras: nn.ModuleDict
    ) -> list[Replacement]:
        """Condition ``backbone`` in place; put method-owned modules (e.g. a λ encoder) in
        ``extras``. Raise :class:`~oat_plugins.surgery.NothingToConditionError` if nothing
        in the backbone can be conditioned."""
        raise NotImplementedError

    # -- 2. set-up that needs data ---------------------------------------------------------
    def prepare(self, model: ConditionalModel, x: torch.Tensor, y: torch.Tensor) -> None:
        """Finish set-up that needs a batch (images in [0, 1], labels), e.g. saliency masks.
        ``fit`` calls it with the first training batch, also on resume, so it must do nothing
        when nothing is pending. Default: nothing."""

    # -- 3. forward ------------------------------------------------------------------------
    def forward(self, model: ConditionalModel, x: torch.Tensor) -> torch.Tensor:
        """``model(x)`` on normalised inputs at the current λ: (N, classes) logits.
        Default: the backbone. (A per-sample λ has already been split into groups when
        :attr:`lambda_groups` is set.)"""
        return model.backbone(x)

    def training_forward(self, model: ConditionalModel, x: torch.Tensor) -> Any:
        """What the training loss needs from normalised inputs (default: :meth:`forward`);
        e.g. every exit's logits for a multi-exit model."""
        return self.forward(model, x)

    # -- 4. loss ---------------------------------------------------------------------------
    def training_loss(self, ctx: LossContext) -> tuple[torch.Tensor, Stats]:
        """The loss of one training batch and its statistics (see
        :func:`~oat_plugins.losses.batch_stats`). Default: OAT's loss."""
        return oat_loss_terms(ctx)

    # -- 5. export -------------------------------------------------------------------------
    def export(self, model: ConditionalModel, lam: float) -> nn.Module:
        """A plain copy of the backbone computing ``model``'s function at scalar ``lam``
        (without the normaliser, which the model adds). Default: fold every conditioned
        piece (dual norms → the chosen norm with FiLM folded in, weight parametrizations →
        plain weights)."""
        with torch.no_grad():
            copied = deepcopy_module(model)  # timm's cached tensors with history too
            copied.condition.lam = lam
            return fold_conditioned(copied.backbone)

    # -- 6. compute knobs set in situ -------------------------------------------------------
    def set_density(self, model: ConditionalModel, density: float) -> None:
        """Keep only a fraction ``density`` of the masked weights, after training (see
        :meth:`ConditionalModel.set_density`). Default: the method has no such knob."""
        raise ValueError(f"method {self.name!r} has no density knob: only a masked model "
                         "('floats', or 'float' with density=...) can set one")

    # -- 7. report -------------------------------------------------------------------------
    def report(self, model: ConditionalModel) -> list[str]:
        """Extra lines for ``model.summary()`` (e.g. sparsity). Default: none."""
        return []

    # -- 8. λ sampling ---------------------------------------------------------------------
    def default_sampler(self) -> LambdaSampler:
        """The λ sampler the method is trained with by default."""
        raise NotImplementedError

    def check_sampler(self, sampler: LambdaSampler) -> None:
        """Raise ``ValueError`` if training with ``sampler`` would leave some λ the model
        serves without trained parameters. Default: any sampler."""

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


def check_choice(value: object, choices: Iterable[str], what: str) -> None:
    """Raise a ``ValueError`` naming ``what`` and the allowed ``choices`` unless ``value`` is
    one of them (the one check behind every string option of a method)."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "<required>"


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``; a clear error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; available methods: {', '.join(available_methods())}"
        ) from None


def available_methods() -> list[str]:
    """Names accepted by ``oat_plugins.wrap(..., method=...)``."""
    return sorted(_REGISTRY)
