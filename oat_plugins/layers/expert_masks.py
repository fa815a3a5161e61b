"""SMART's two expert masks on one shared weight, as a ``torch.nn.utils.parametrize``
parametrization reading the shared condition: W ↦ W ⊙ M_c at λ = 0 (clean path), W ⊙ M_a at
λ = 1 (adversarial path), and a documented rule in between."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..condition import Condition
from .base import ConditionedParametrization, FoldCache, parametrizations_of

LAMBDA_RULES = ("blend", "switch")
"""How the effective weight depends on an intermediate λ (see :class:`ExpertMasks`)."""


class ExpertMasks(ConditionedParametrization):
    """W ↦ W ⊙ M(λ) with two boolean buffers ``clean`` (M_c) and ``adversarial`` (M_a), saved
    in the checkpoint.

    ``rule='blend'``: M(λ) = (1 − λ)·M_c + λ·M_a, so an entry of both masks keeps its full
    weight, one of M_c only is scaled by 1 − λ and one of M_a only by λ (λ = 0 and λ = 1 are
    exactly the two paths; in between the union is used). ``rule='switch'`` (the public
    prototypes): M_c at λ = 0, M_a at any λ > 0, like the dual norm.

    The gradient of the underlying weight is the output gradient times M(λ): a weight outside
    a path's mask gets nothing from that path's samples, and one outside both gets nothing at
    all (:func:`apply_expert_masks` zeroes those, so SGD with momentum and weight decay, and
    AdamW, keep them exactly zero).

    Masks that need data (saliency) are created *pending* (all ones): the forward raises
    until :meth:`set_masks`, except inside :func:`measuring`. Needs a scalar λ (the model runs
    one forward per λ group: ``Method.lambda_groups``).
    """

    def __init__(self, shape: Sequence[int], condition: Condition, *,
                 clean: torch.Tensor | None = None, adversarial: torch.Tensor | None = None,
                 rule: str = "switch", device: torch.device | str | None = None) -> None:
        super().__init__(condition)
        if rule not in LAMBDA_RULES:
            raise ValueError(f"unknown λ rule {rule!r}; choose one of {list(LAMBDA_RULES)}")
        self.rule = rule
        self.pending = clean is None or adversarial is None
        self.measuring = False
        ones = torch.ones(tuple(shape), dtype=torch.bool, device=device)
        for name, mask in (("clean", clean), ("adversarial", adversarial)):
            mask = ones if mask is None else mask
            if tuple(mask.shape) != tuple(shape):
                raise ValueError(f"{name} mask shape {tuple(mask.shape)} != weight shape "
                                 f"{tuple(shape)}")
            # a copy each: the two buffers must never share storage (set_masks writes both)
            self.register_buffer(name, mask.to(dtype=torch.bool, device=device or mask.device,
                                               copy=True))
        self._folded: FoldCache[torch.Tensor] = FoldCache()

    def coefficient(self, lam: float) -> torch.Tensor:
        """M(λ): a boolean mask at λ ∈ {0, 1} (and for ``'switch'``), else a float one."""
        if lam == 0:
            return self.clean
        if lam == 1 or self.rule == "switch":
            return self.adversarial
        lam_t = torch.tensor(lam, device=self.clean.device)
        zero = torch.zeros((), device=self.clean.device)
        return torch.where(self.clean & self.adversarial, 1.0 - zero, torch.where(
            self.clean, 1.0 - lam_t, torch.where(self.adversarial, lam_t, zero)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.pending and not self.measuring:
            raise RuntimeError(
                "the expert masks have not been chosen yet (selection='saliency' needs a "
                "batch): call model.method.prepare(model, x, y) (oat_plugins.train.fit does) "
                "first")
        if not self.condition.is_scalar:
            raise RuntimeError(
                "ExpertMasks needs one scalar λ per forward (a weight cannot differ per "
                "sample within a batch); ConditionalModel runs one forward per λ group")
        if self.pending:  # measuring saliency: the dense weight on both paths
            return weight
        lam = self.condition.lam
        if self.condition.serves_folded:  # no gradient wanted: mask once per λ
            return self._folded.get(lam, (weight, self.clean, self.adversarial),
                                    lambda: self._masked(weight, lam))
        return self._masked(weight, lam)

    def _masked(self, weight: torch.Tensor, lam: float) -> torch.Tensor:
        coefficient = self.coefficient(lam)
        # a boolean mask multiplies as it is (promoted inside the kernel): converting it first
        # would write a weight-sized copy every forward
        return weight * (coefficient if coefficient.dtype == torch.bool
                         else coefficient.to(weight.dtype))

    @torch.no_grad()
    def set_masks(self, clean: torch.Tensor, adversarial: torch.Tensor) -> None:
        """Replace both masks (same shape) and clear the pending flag."""
        for mask in (clean, adversarial):
            if mask.shape != self.clean.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != "
                                 f"{tuple(self.clean.shape)}")
        self.clean.copy_(clean.to(torch.bool))
        self.adversarial.copy_(adversarial.to(torch.bool))
        self.pending = False

    @property
    def union(self) -> torch.Tensor:
        return self.clean | self.adversarial

    def get_extra_state(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.pending = bool(state["pending"])

    def extra_repr(self) -> str:
        if self.pending:
            return f"rule={self.rule!r}, pending"
        c, a = (float(m.float().mean()) for m in (self.clean, self.adversarial))
        shared = float((self.clean & self.adversarial).float().mean())
        return f"rule={self.rule!r}, clean={c:.3f}, adversarial={a:.3f}, shared={shared:.3f}"


@torch.no_grad()
def apply_expert_masks(module: nn.Module, masks: ExpertMasks, tensor_name: str = "weight"
                       ) -> None:
    """Register ``masks`` on ``module.<tensor_name>`` and zero the underlying parameter outside
    the union of the two masks (so weight decay and momentum keep it zero)."""
    with measuring([masks]):  # registration evaluates the parametrization once
        parametrize.register_parametrization(module, tensor_name, masks)
    zero_outside_union(module, masks, tensor_name)


@torch.no_grad()
def zero_outside_union(module: nn.Module, masks: ExpertMasks, tensor_name: str = "weight"
                       ) -> None:
    """Zero the underlying parameter where neither mask keeps it."""
    original = module.parametrizations[tensor_name].original
    original.mul_(masks.union.to(original.dtype))


def expert_masks(root: nn.Module) -> list[tuple[nn.Module, str, ExpertMasks]]:
    """(module, tensor name, masks) for every :class:`ExpertMasks` registered under ``root``."""
    return parametrizations_of(root, ExpertMasks)


@contextlib.contextmanager
def measuring(masks: Sequence[ExpertMasks]) -> Iterator[None]:
    """Let pending masks run (as the dense weight) while saliency is measured."""
    for mask in masks:
        mask.measuring = True
    try:
        yield
    finally:
        for mask in masks:
            mask.measuring = False
