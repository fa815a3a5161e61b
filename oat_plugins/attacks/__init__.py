"""Attacks: one name → factory registry shared by training, evaluation and GDWS.

>>> from oat_plugins.attacks import available_attacks, build_attack
>>> available_attacks()
['pgd', 'fgsm', 'cw', 'apgd', 'apgd-t', 'square', 'autoattack', 'eot-pgd', 'pgd-l2', 'fgsm-rs',
 'single-exit-pgd', 'average-exit-pgd', 'max-average-exit-pgd', 'routing-pgd', 'slowdown-pgd']
>>> attack = build_attack("pgd", model, eps=8 / 255, steps=10)   # torchattacks.PGD
>>> attack = build_attack("TPGD", model, eps=8 / 255, steps=10)  # any torchattacks class

Names are case-insensitive; aliases: ``ffgsm`` (fgsm-rs), ``apgdt``, ``eotpgd``, ``pgdl2``.
The multi-exit attacks (:mod:`oat_plugins.attacks.multiexit`) need a model with exits.
A registered name wins over the torchattacks class it shadows (``CW`` is :class:`CWLinf`);
``torchattacks.CW`` names torchattacks' class explicitly. :func:`register_attack` adds names.
Each caller keeps its documented step-size default by passing ``alpha``; the registry's own
default is ``2.5·eps/steps`` (1.25·eps for ``fgsm-rs``).
"""

from . import builtin  # noqa: F401  (registers the built-in names)
from .cw import CWLinf
from .multiexit import (  # registers the multi-exit attacks, after the built-ins
    MULTIEXIT_ATTACKS,
    AverageExitPGD,
    MaxAverageExitPGD,
    RoutingPGD,
    SingleExitPGD,
    SlowdownPGD,
)
from .registry import (
    ATTACKS,
    PARAMETERS,
    AttackConfig,
    AttackFactory,
    AttackSpec,
    attack_names_help,
    available_attacks,
    build_attack,
    find_attack,
    get_attack,
    queries_whole_batch,
    register_attack,
    resolve_attack,
    unregister_attack,
)

__all__ = [
    "ATTACKS",
    "PARAMETERS",
    "AttackConfig",
    "AttackFactory",
    "AttackSpec",
    "AverageExitPGD",
    "CWLinf",
    "MULTIEXIT_ATTACKS",
    "MaxAverageExitPGD",
    "RoutingPGD",
    "SingleExitPGD",
    "SlowdownPGD",
    "attack_names_help",
    "available_attacks",
    "build_attack",
    "find_attack",
    "get_attack",
    "queries_whole_batch",
    "register_attack",
    "resolve_attack",
    "unregister_attack",
]
