"""The attacks the package registers: torchattacks classes with the settings evaluation and
training use, and :class:`~oat_plugins.attacks.cw.CWLinf`.

Registration order is the order :func:`~oat_plugins.attacks.available_attacks` lists."""

from __future__ import annotations

from functools import partial

import torchattacks
from torch import nn
from torchattacks.attack import Attack

from .cw import CWLinf
from .registry import register_attack


def _square(model: nn.Module, *, eps: float, steps: int, seed: int) -> Attack:
    # Square is query-based: ``steps`` is its query budget.
    return torchattacks.Square(model, norm="Linf", eps=eps, n_queries=steps, seed=seed)


def _register_builtins() -> None:
    register_attack("pgd", torchattacks.PGD, label="PGD-{steps}",
                    help="L∞ PGD with random start (torchattacks PGD)")
    register_attack("fgsm", torchattacks.FGSM, label="FGSM", help="FGSM, one step of ε")
    register_attack("cw", CWLinf, label="CW∞-{steps}",
                    help="L∞ PGD on the Carlini–Wagner margin loss (CWLinf)")
    register_attack("apgd", partial(torchattacks.APGD, norm="Linf", loss="ce"),
                    label="APGD-CE-{steps}", help="torchattacks APGD with the CE loss")
    register_attack("apgd-t", partial(torchattacks.APGDT, norm="Linf"), label="APGD-T-{steps}",
                    aliases=("apgdt",), help="torchattacks APGDT (targeted DLR)")
    register_attack("square", _square, label="Square-{steps}q",
                    help="Square attack, steps = queries")
    register_attack("autoattack",
                    partial(torchattacks.AutoAttack, norm="Linf", version="standard"),
                    label="AutoAttack (torchattacks preset)",
                    help="torchattacks' AutoAttack preset (not the leaderboard's iterations)")
    register_attack("eot-pgd", partial(torchattacks.EOTPGD, eot_iter=10),
                    label="EOT-PGD-{steps}×10", aliases=("eotpgd",),
                    help="PGD with 10-sample expectation over transformation")
    register_attack("pgd-l2", torchattacks.PGDL2, norm="L2", label="PGD-L2-{steps}",
                    aliases=("pgdl2",), help="L2 PGD with random start")
    register_attack("fgsm-rs", torchattacks.FFGSM, label="FGSM-RS", aliases=("ffgsm",),
                    default_alpha=lambda eps, steps: 1.25 * eps,
                    help="FGSM from a random start, step 1.25ε (Wong et al.; fast training)")


_register_builtins()
