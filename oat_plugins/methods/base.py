"""The method interface and the registry that ``wrap`` looks methods up in."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from ..condition import Condition
from ..samplers import LambdaSampler
from ..surgery import Replacement

_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """A conditioning method: one subclass per module, registered by name.

    A subclass declares ``name``, an ``Options`` dataclass (its keyword options, all
    JSON-friendly so they round-trip through a checkpoint) and implements :meth:`apply`,
    which performs the surgery on the backbone in place. Folding back at a fixed λ is done by
    the conditioned pieces themselves (``ConditionedModule.fold`` / parametrizations), so a
    method needs no export code of its own.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    per_sample: ClassVar[bool] = True
    """Whether λ may be a per-sample tensor (one λ per input)."""
    lambda_groups: ClassVar[bool] = False
    """Whether a per-sample λ is served by one backbone forward per distinct λ value (for
    methods whose weights depend on λ, where one batched forward cannot give each sample its
    own weight). The model then concatenates the groups back in input order."""

    def __init__(self, **options: Any) -> None:
        fields = {f.name: f for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            allowed = ", ".join(
                f"{n}={_default(f)!r}" for n, f in fields.items()
            )
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; "
                f"allowed options (with defaults): {allowed}"
            )
        self.options = self.Options(**options)

    def apply(
        self, backbone: nn.Module, condition: Condition, extras: nn.ModuleDict
    ) -> list[Replacement]:
        """Condition ``backbone`` in place; put method-owned modules (e.g. a λ encoder) in
        ``extras``. Raise :class:`~oat_plugins.surgery.NothingToConditionError` if nothing
        in the backbone can be conditioned."""
        raise NotImplementedError

    def default_sampler(self) -> LambdaSampler:
        """The λ sampler the method is trained with by default."""
        raise NotImplementedError

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


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
