"""L∞ PGD attacks on multi-exit models (RDI-Nets, Hu et al., ICLR 2020, "Triple Wins"; the
slowdown attack after DeepSloth, Hong et al., ICLR 2021).

A multi-exit model exposes ``exit_logits(x) -> list[Tensor]`` (the (N, C) logits of every exit,
the last one the backbone's own head) and, for routing, ``route(exit_logits) -> LongTensor``
(the exit its router picks per sample). Every attack here is one PGD loop
(:meth:`ExitPGD.ascend`) over a per-sample objective of the exits' logits:

=========================  ==================================================================
``SingleExitPGD(exit=k)``  CE of exit k
``AverageExitPGD``         mean CE over the exits
``MaxAverageExitPGD``      one single-exit PGD per exit; per sample, the candidate with the
                           largest summed CE over the exits (the reference's training attack)
``RoutingPGD``             CE of the exit the router picks, re-routed at every step
``SlowdownPGD``            summed softmax entropy of the early exits: pushes inputs to late
                           exits (an attack on the compute saving, not on accuracy)
=========================  ==================================================================

Each is a ``torchattacks.Attack`` built like ``torchattacks.PGD`` (``eps``, ``alpha``,
``steps``, ``random_start``), untargeted, in [0, 1], and registered by name (see
:data:`MULTIEXIT_ATTACKS`) so that training (``TrainConfig.attack``) and evaluation use them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchattacks.attack import Attack

from ..exits import entropy
from .registry import register_attack

__all__ = [
    "MULTIEXIT_ATTACKS",
    "AverageExitPGD",
    "ExitPGD",
    "MaxAverageExitPGD",
    "RoutingPGD",
    "SingleExitPGD",
    "SlowdownPGD",
    "exit_cross_entropy",
    "exit_entropy",
]

Objective = Callable[[Sequence[torch.Tensor], torch.Tensor | None], torch.Tensor]
"""``objective(exit_logits, labels) -> (N,)``: what the PGD loop maximises, per sample."""


def exit_cross_entropy(exit_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(E, N): the cross-entropy of every exit for every sample."""
    return torch.stack([F.cross_entropy(logits, labels, reduction="none")
                        for logits in exit_logits])


def exit_entropy(exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(E, N): the softmax entropy of every exit for every sample (what the router reads)."""
    return torch.stack([entropy(logits) for logits in exit_logits])


def _check_multiexit(model: nn.Module, attack: str, needs_route: bool) -> None:
    """A one-line TypeError when ``model`` has no exits (or no router) to attack."""
    needed = ("exit_logits", "route") if needs_route else ("exit_logits",)
    # A ConditionalModel has the methods either way; its ``exits`` is None without exits.
    if all(callable(getattr(model, name, None)) for name in needed) and \
            getattr(model, "exits", True) is not None:
        return
    wanted = " and ".join(f"{name}()" for name in needed)
    raise TypeError(f"{attack} attacks a multi-exit model (wrap(backbone, method='multiexit'), "
                    f"exits='auto', or any module with {wanted}), but this "
                    f"{type(model).__name__} has no exits")


class ExitPGD(Attack):
    """L∞ PGD maximising a per-sample objective of every exit's logits (the shared loop).

    Subclasses define :meth:`objective`; the loop is torchattacks' PGD (random start in the
    ε-ball, signed-gradient steps of ``alpha``, projection onto the ε-ball and [0, 1]) with the
    model's ``exit_logits`` in place of ``get_logits`` (normalisation set with
    ``set_normalization_used`` is applied the same way).

    Args:
        model: a multi-exit model (``exit_logits(x)``; ``route`` for routing attacks).
        eps: L∞ radius.
        alpha: step size.
        steps: iterations.
        random_start: start from a uniform point of the ε-ball.
    """

    needs_route = False
    """Whether the objective reads the model's router (``route``)."""
    queries_whole_batch = True
    """Every model call is on the whole batch, in order (so training may attack a batch of
    per-sample λ in one call; see :func:`~oat_plugins.attacks.queries_whole_batch`)."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, random_start: bool = True) -> None:
        _check_multiexit(model, type(self).__name__, self.needs_route)
        super().__init__(type(self).__name__, model)
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.random_start = random_start
        self.supported_mode = ["default"]

    def objective(self, exit_logits: Sequence[torch.Tensor],
                  labels: torch.Tensor | None) -> torch.Tensor:
        """(N,): what the attack maximises for each sample."""
        raise NotImplementedError

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits, like ``get_logits`` (normalising first where torchattacks
        would)."""
        if self._normalization_applied is False:
            x = self.normalize(x)
        return list(self.model.exit_logits(x))

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial images maximising :meth:`objective`."""
        images, labels = self._on_device(images, labels)
        return self.ascend(images, labels, self.objective)

    def _on_device(self, images: torch.Tensor,
                   labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = images.clone().detach().to(self.device)
        if labels is None:
            return images, None
        return images, labels.clone().detach().to(self.device)

    def ascend(self, images: torch.Tensor, labels: torch.Tensor | None,
               objective: Objective) -> torch.Tensor:
        """The PGD loop: ``steps`` signed-gradient steps on ``objective`` summed over the batch
        (each sample's gradient is its own), projected onto the ε-ball around ``images`` and
        [0, 1]."""
        adv = images.clone().detach()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            loss = objective(self.exit_logits(adv), labels).sum()
            grad = torch.autograd.grad(loss, adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv


def _labels(labels: torch.Tensor | None, attack: str) -> torch.Tensor:
    if labels is None:
        raise ValueError(f"{attack} maximises a cross-entropy: pass the labels, "
                         "attack(images, labels)")
    return labels


class SingleExitPGD(ExitPGD):
    """PGD on the cross-entropy of one exit (``exit``: its index, negative from the end; the
    default -1 is the backbone's own head)."""

    def __init__(self, model: nn.Module, eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, random_start: bool = True, *, exit: int = -1) -> None:
        if isinstance(exit, bool) or not isinstance(exit, int):
            raise TypeError(f"exit must be an exit index (int), got {exit!r}")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
        self.exit = exit

    def objective(self, exit_logits: Sequence[torch.Tensor],
                  labels: torch.Tensor | None) -> torch.Tensor:
        return _exit_ce(exit_logits, _labels(labels, self.attack), self.exit)


def _exit_ce(exit_logits: Sequence[torch.Tensor], labels: torch.Tensor,
             exit: int) -> torch.Tensor:
    if not -len(exit_logits) <= exit < len(exit_logits):
        raise ValueError(f"exit {exit} does not exist: the model has {len(exit_logits)} exits "
                         f"(indices {-len(exit_logits)} to {len(exit_logits) - 1})")
    return F.cross_entropy(exit_logits[exit], labels, reduction="none")


class AverageExitPGD(ExitPGD):
    """PGD on the mean cross-entropy over the exits."""

    def objective(self, exit_logits: Sequence[torch.Tensor],
                  labels: torch.Tensor | None) -> torch.Tensor:
        return exit_cross_entropy(exit_logits, _labels(labels, self.attack)).mean(0)


class MaxAverageExitPGD(ExitPGD):
    """Max-average attack (the reference's training attack): one single-exit PGD per exit
    (E× the cost of one PGD), then, per sample, the candidate with the largest summed
    cross-entropy over the exits."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        images, labels = self._on_device(images, _labels(labels, self.attack))
        with torch.no_grad():
            n_exits = len(self.exit_logits(images))
        candidates = torch.stack([
            self.ascend(images, labels, lambda logits, y, k=k: _exit_ce(logits, y, k))
            for k in range(n_exits)])
        with torch.no_grad():
            scores = torch.stack([self.objective(self.exit_logits(c), labels)
                                  for c in candidates])
        best = scores.argmax(0)
        return candidates[best, torch.arange(images.shape[0], device=images.device)]

    def objective(self, exit_logits: Sequence[torch.Tensor],
                  labels: torch.Tensor | None) -> torch.Tensor:
        """The selection score: the summed cross-entropy over the exits."""
        return exit_cross_entropy(exit_logits, _labels(labels, self.attack)).sum(0)


class RoutingPGD(ExitPGD):
    """PGD on the cross-entropy of the exit the model's router picks for each sample, routed
    again at every step (so the attack follows a sample that changes exit)."""

    needs_route = True

    def objective(self, exit_logits: Sequence[torch.Tensor],
                  labels: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            picked = self.model.route([logits.detach() for logits in exit_logits])
        stacked = torch.stack(list(exit_logits))  # (E, N, C)
        rows = torch.arange(stacked.shape[1], device=stacked.device)
        return F.cross_entropy(stacked[picked.to(stacked.device), rows],
                               _labels(labels, self.attack), reduction="none")


class SlowdownPGD(ExitPGD):
    """Slowdown attack (DeepSloth-style): maximise the summed softmax entropy of every early
    exit (all but the last), so that the entropy router sends inputs to late exits. Labels
    are not used (``attack(images)`` works)."""

    def objective(self, exit_logits: Sequence[torch.Tensor],
                  labels: torch.Tensor | None) -> torch.Tensor:
        if len(exit_logits) < 2:
            raise ValueError("SlowdownPGD needs a model with at least one early exit "
                             f"(got {len(exit_logits)} exit)")
        return exit_entropy(exit_logits[:-1]).sum(0)


MULTIEXIT_ATTACKS: dict[str, type[ExitPGD]] = {
    "single-exit-pgd": SingleExitPGD,
    "average-exit-pgd": AverageExitPGD,
    "max-average-exit-pgd": MaxAverageExitPGD,
    "routing-pgd": RoutingPGD,
    "slowdown-pgd": SlowdownPGD,
}
"""The registered names of the attacks of this module (they need a multi-exit model)."""

_HELP = {
    "single-exit-pgd": "L∞ PGD on the last exit's CE (SingleExitPGD(exit=k) for another exit)",
    "average-exit-pgd": "L∞ PGD on the mean CE over the exits of a multi-exit model",
    "max-average-exit-pgd": "one PGD per exit, per sample the largest summed CE (RDI-Nets)",
    "routing-pgd": "L∞ PGD on the CE of the exit the router picks, re-routed every step",
    "slowdown-pgd": "L∞ PGD maximising the early exits' entropy (slowdown, DeepSloth-style)",
}
_LABEL = {
    "single-exit-pgd": "SingleExitPGD-{steps} at the last exit",
    "average-exit-pgd": "AverageExitPGD-{steps}",
    "max-average-exit-pgd": "MaxAverageExitPGD-{steps}",
    "routing-pgd": "RoutingPGD-{steps}",
    "slowdown-pgd": "SlowdownPGD-{steps}",
}


def _register() -> None:
    for name, cls in MULTIEXIT_ATTACKS.items():
        register_attack(name, cls, label=_LABEL[name], help=_HELP[name])


_register()
