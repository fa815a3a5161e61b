"""Parameter statistics that hold for any model, conditioned or plain."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize


class NonZero(NamedTuple):
    """Non-zero and total parameter counts."""

    nonzero: int
    total: int

    @property
    def density(self) -> float:
        return self.nonzero / max(self.total, 1)


@torch.no_grad()
def count_nonzero(module: nn.Module) -> NonZero:
    """Non-zero entries of the weights ``module`` actually computes with.

    A parametrized tensor (weight noise, masks, ...) counts the entries of its effective value
    at the current λ, not of the stored original; every other parameter counts as stored
    (each shared tensor once). Works on conditioned models and on plain (exported) ones.
    """
    nonzero = total = 0
    originals: set[int] = set()
    for mod in module.modules():
        if not parametrize.is_parametrized(mod):
            continue
        for name, plist in mod.parametrizations.items():
            originals.add(id(plist.original))
            effective = getattr(mod, name)
            nonzero += int((effective != 0).sum())
            total += effective.numel()
    for p in module.parameters():
        if id(p) not in originals:
            nonzero += int((p != 0).sum())
            total += p.numel()
    return NonZero(nonzero, total)
