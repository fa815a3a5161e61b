"""The attack registry: one vocabulary of names for training, evaluation and GDWS.

A name resolves, case-insensitively, to a registered attack (or one of its aliases) first, then
to a torchattacks attack class (``"TPGD"``, ``"mifgsm"``, or ``"torchattacks.CW"`` to pick
torchattacks' class where a registered name shadows it). Every builder is called with the
model and whichever of the build parameters (:data:`PARAMETERS`) its signature accepts, so
a torchattacks class and a registered function are built the same way.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torchattacks
from torch import nn
from torchattacks.attack import Attack

__all__ = [
    "queries_whole_batch",
    "ATTACKS",
    "PARAMETERS",
    "AttackConfig",
    "AttackFactory",
    "AttackSpec",
    "attack_names_help",
    "available_attacks",
    "build_attack",
    "find_attack",
    "get_attack",
    "register_attack",
    "resolve_attack",
    "unregister_attack",
]

AttackFactory = Callable[[nn.Module], Attack]
"""``factory(model) -> torchattacks Attack``: what training and evaluation accept directly."""

AttackBuilder = Callable[..., Attack]
"""``builder(model, **params)`` with ``params`` among :data:`PARAMETERS`."""

PARAMETERS: tuple[str, ...] = ("eps", "alpha", "steps", "random_start", "n_classes", "seed")
"""The build parameters offered to every builder (each gets those its signature accepts)."""

DEFAULT_EPS: dict[str, float] = {"Linf": 8 / 255, "L2": 0.5}
_NORM_SYMBOL = {"Linf": "L∞", "L2": "L2"}
_TORCHATTACKS_PREFIX = "torchattacks."


@dataclass(frozen=True)
class AttackSpec:
    """A named attack: its builder and how results describe it.

    Attributes:
        name: the canonical (lower-case) name.
        builder: ``builder(model, **params) -> Attack`` (a torchattacks class works as is).
        norm: ``'Linf'`` or ``'L2'`` (the default ε and the description), or None (unbounded).
        label: the description's head; ``{steps}`` is replaced by the iterations.
        aliases: further accepted names.
        default_alpha: ``f(eps, steps)``, the step size when none is given; None →
            ``2.5·eps/steps`` (Madry et al.) for a builder that takes ``steps``.
        help: one line for documentation.
    """

    name: str
    builder: AttackBuilder
    norm: str | None = "Linf"
    label: str = ""
    aliases: tuple[str, ...] = ()
    default_alpha: Callable[[float, int], float] | None = None
    help: str = ""

    @property
    def accepts(self) -> frozenset[str]:
        """The build parameters the builder takes (all of them with ``**kwargs``)."""
        return _accepted(self.builder)


ATTACKS: dict[str, AttackSpec] = {}
"""Registered attacks by canonical name, in registration order (see :func:`register_attack`)."""

_KEYS: dict[str, str] = {}  # lower-case name or alias -> canonical name


def queries_whole_batch(attack: Attack) -> bool:
    """Whether ``attack`` only ever calls the model on its whole batch, in order (gradient
    sign attacks), so each sample may keep its own λ during one call. Attacks that query
    subsets of their batch (APGD, APGDT, FAB, Square, AutoAttack, ...) or are not known here
    return False and are run one λ group at a time. An attack class of its own says so with a
    class attribute ``queries_whole_batch = True`` (ours: the multi-exit attacks)."""
    import torchattacks

    declared = getattr(attack, "queries_whole_batch", None)
    if isinstance(declared, bool):
        return declared
    whole_batch = (torchattacks.PGD, torchattacks.FGSM, torchattacks.FFGSM, torchattacks.PGDL2,
                   torchattacks.EOTPGD, torchattacks.TPGD, torchattacks.BIM, torchattacks.MIFGSM)
    return isinstance(attack, whole_batch)


def _accepted(builder: AttackBuilder) -> frozenset[str]:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin without a signature: offer everything
        return frozenset(PARAMETERS)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(PARAMETERS)
    return frozenset(k for k in PARAMETERS if k in params)


def register_attack(
    name: str,
    builder: AttackBuilder | None = None,
    *,
    norm: str | None = "Linf",
    label: str | None = None,
    aliases: tuple[str, ...] = (),
    default_alpha: Callable[[float, int], float] | None = None,
    help: str = "",
    replace: bool = False,
) -> Any:
    """Register ``builder`` under ``name`` (and ``aliases``), case-insensitively.

    ``builder(model, **params)`` returns a torchattacks ``Attack`` and receives whichever of
    :data:`PARAMETERS` (eps, alpha, steps, random_start, n_classes, seed) its signature
    accepts. Without ``builder`` this is a decorator. A name already taken is a ValueError
    unless ``replace=True`` (which replaces an attack of the same canonical name).

    >>> @register_attack("my-pgd", label="MyPGD-{steps}")
    ... def my_pgd(model, *, eps, alpha, steps):
    ...     return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps)
    """
    if builder is None:
        def decorate(fn: AttackBuilder) -> AttackBuilder:
            register_attack(name, fn, norm=norm, label=label, aliases=aliases,
                            default_alpha=default_alpha, help=help, replace=replace)
            return fn
        return decorate
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"attack name must be a non-empty string without surrounding spaces, "
                         f"got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable(model, **params) -> Attack, got {builder!r}")
    if norm is not None and norm not in DEFAULT_EPS:
        raise ValueError(f"norm must be one of {', '.join(DEFAULT_EPS)} or None, got {norm!r}")
    key = name.lower()
    keys = [key, *(a.lower() for a in aliases)]
    taken = [k for k in keys if k in _KEYS and not (replace and _KEYS[k] == key)]
    if taken:
        raise ValueError(f"attack name(s) {', '.join(taken)} already registered "
                         "(pass replace=True to replace an attack)")
    if key in ATTACKS:
        for alias in ATTACKS[key].aliases:
            _KEYS.pop(alias.lower(), None)
    if label is None:
        label = name + ("-{steps}" if "steps" in _accepted(builder) else "")
    ATTACKS[key] = AttackSpec(key, builder, norm, label, tuple(aliases), default_alpha, help)
    _KEYS.update(dict.fromkeys(keys, key))
    return builder


def unregister_attack(name: str) -> None:
    """Remove a registered attack (by name or alias) and its aliases."""
    spec = get_attack(name)
    if ATTACKS.get(spec.name) is not spec:
        raise ValueError(f"{name!r} names torchattacks.{spec.name}, not a registered attack")
    del ATTACKS[spec.name]
    for key in [k for k, v in _KEYS.items() if v == spec.name]:
        del _KEYS[key]


def available_attacks() -> list[str]:
    """Registered attack names (each torchattacks class name is accepted as well)."""
    return list(ATTACKS)


def attack_names_help() -> str:
    """The vocabulary in one phrase, for error messages and ``--help``."""
    return (f"{', '.join(ATTACKS)} (case-insensitive), or a torchattacks attack class name "
            "(e.g. TPGD, MIFGSM, torchattacks.CW)")


def _torchattacks_classes() -> dict[str, type[Attack]]:
    return {name.lower(): cls for name, cls in vars(torchattacks).items()
            if inspect.isclass(cls) and issubclass(cls, Attack) and cls is not Attack}


def _torchattacks_spec(cls: type[Attack]) -> AttackSpec:
    """A spec for a torchattacks class built by name: L2 if the class says so, else L∞ when
    it takes ``eps`` (None: unbounded, e.g. CW or DeepFool)."""
    params = list(inspect.signature(cls).parameters.values())[1:]  # after the model
    required = [p.name for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise ValueError(f"torchattacks.{cls.__name__} needs {', '.join(required)}, so it "
                         "cannot be built from its name; pass a factory callable(model) -> Attack")
    declared = next((p.default for p in params if p.name == "norm"), None)
    if "L2" in cls.__name__ or declared == "L2":
        norm: str | None = "L2"
    else:
        norm = "Linf" if any(p.name == "eps" for p in params) else None
    label = cls.__name__ + ("-{steps}" if any(p.name == "steps" for p in params) else "")
    return AttackSpec(cls.__name__, cls, norm, label, help=f"torchattacks.{cls.__name__}")


def find_attack(name: str) -> AttackSpec | None:
    """The attack ``name`` means (registered names first, then torchattacks classes), or
    None when it means nothing."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    if key.startswith(_TORCHATTACKS_PREFIX):
        cls = _torchattacks_classes().get(key[len(_TORCHATTACKS_PREFIX):])
        return None if cls is None else _torchattacks_spec(cls)
    if key in _KEYS:
        return ATTACKS[_KEYS[key]]
    cls = _torchattacks_classes().get(key)
    return None if cls is None else _torchattacks_spec(cls)


def get_attack(name: str) -> AttackSpec:
    """Like :func:`find_attack`, but an unknown name is a ValueError listing the names."""
    spec = find_attack(name)
    if spec is None:
        raise ValueError(f"unknown attack {name!r}; available attacks: {attack_names_help()}; "
                         "or pass a factory callable(model) -> Attack")
    return spec


def format_eps(eps: float, norm: str | None) -> str:
    """8/255 for the usual L∞ radii and steps, else 4 significant digits."""
    if norm == "Linf" and 0 < eps < 1:
        k = round(eps * 255)
        if k >= 1 and math.isclose(k, eps * 255, rel_tol=1e-6):
            return f"{k}/255"
    return f"{eps:.4g}"


@dataclass(frozen=True)
class AttackConfig:
    """A resolved attack: what to build, and how results describe it."""

    name: str
    norm: str | None
    eps: float | None
    steps: int | None
    alpha: float | None
    seed: int
    description: str
    factory: AttackFactory = field(repr=False, compare=False)


def _checked(value: float, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value}")
    return value


def _resolve_numbers(spec: AttackSpec, eps: float | None, steps: int,
                     alpha: float | None) -> tuple[float | None, int, float | None]:
    """ε (the norm's default when None), steps and α (the attack's default when None), each
    None where the builder does not take it."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    takes = spec.accepts
    if "eps" not in takes:
        eps = None
    elif eps is None:
        eps = DEFAULT_EPS.get(spec.norm or "", None)
    else:
        eps = _checked(eps, "eps")
    if "alpha" not in takes:
        alpha = None
    elif alpha is not None:
        alpha = _checked(alpha, "alpha")
    elif eps is not None and spec.default_alpha is not None:
        alpha = spec.default_alpha(eps, steps)
    elif eps is not None and "steps" in takes:
        alpha = 2.5 * eps / steps
    return eps, steps, alpha


def _description(spec: AttackSpec, eps: float | None, steps: int, alpha: float | None) -> str:
    details = [_NORM_SYMBOL[spec.norm]] if spec.norm else []
    if eps is not None:
        details.append(f"ε={format_eps(eps, spec.norm)}")
    if alpha is not None:
        details.append(f"α={format_eps(alpha, spec.norm)}")
    head = spec.label.format(steps=steps)
    return f"{head} ({', '.join(details)})" if details else head


def resolve_attack(
    attack: str | AttackFactory,
    *,
    eps: float | None = None,
    steps: int = 20,
    alpha: float | None = None,
    random_start: bool = True,
    n_classes: int = 10,
    seed: int = 0,
) -> AttackConfig:
    """Turn an attack name or a factory ``callable(model) -> Attack`` into an
    :class:`AttackConfig` (its ``factory`` builds the attack on a model).

    Defaults: ``eps`` 8/255 for L∞ and 0.5 for L2 attacks; ``alpha`` the attack's own default
    (``fgsm-rs``: 1.25·eps) or ``2.5·eps/steps`` (Madry et al.). Parameters the attack does
    not take are dropped (None in the config)."""
    if callable(attack) and not isinstance(attack, str):
        name = getattr(attack, "__name__", type(attack).__name__)
        return AttackConfig(name, None, eps, None, alpha, seed, f"custom attack {name}", attack)
    spec = get_attack(attack)
    eps, steps, alpha = _resolve_numbers(spec, eps, steps, alpha)
    offered = {"eps": eps, "alpha": alpha, "steps": steps, "random_start": bool(random_start),
               "n_classes": int(n_classes), "seed": seed}
    kwargs = {k: v for k, v in offered.items() if k in spec.accepts and v is not None}

    def factory(model: nn.Module) -> Attack:
        return spec.builder(model, **kwargs)

    return AttackConfig(spec.name, spec.norm, eps, steps if "steps" in spec.accepts else None,
                        alpha, seed, _description(spec, eps, steps, alpha), factory)


def build_attack(
    name: str | AttackFactory,
    model: nn.Module,
    *,
    eps: float | None = None,
    alpha: float | None = None,
    steps: int = 20,
    random_start: bool = True,
    n_classes: int | None = None,
    seed: int = 0,
) -> Attack:
    """The attack ``name`` (or a factory) on ``model`` (build it after the model is on its device:
    torchattacks reads the device from the parameters). ``n_classes`` defaults to
    ``model.num_classes`` (else 10); the other defaults are :func:`resolve_attack`'s."""
    if n_classes is None:
        n_classes = int(getattr(model, "num_classes", None) or 10)
    config = resolve_attack(name, eps=eps, steps=steps, alpha=alpha, random_start=random_start,
                            n_classes=n_classes, seed=seed)
    return config.factory(model)
