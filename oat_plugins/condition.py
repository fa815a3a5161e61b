"""The condition λ and the one mechanism by which it reaches conditioned layers.

A :class:`Condition` is a small shared object. The :class:`~oat_plugins.ConditionalModel` owns
it, every conditioned layer holds a reference to it, and ``set_lambda`` writes it. Layers never
receive λ as a forward argument, so timm blocks that call their children with one argument,
torchattacks and RobustBench keep working unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import ConditionalModel

Lambda = float | torch.Tensor
"""A scalar λ for the whole batch, or a tensor of shape (N,) with one λ per sample."""


def validate_lambda(lam: object, *, per_sample: bool = True) -> Lambda:
    """Return ``lam`` as a Python float or a 1-D float tensor, or raise ``ValueError``.

    Allowed: a real number in [0, 1]; a 0-d tensor holding one; and, when ``per_sample`` is
    true, a 1-D tensor (or list) of numbers in [0, 1], one per sample.
    """
    if isinstance(lam, bool):
        raise ValueError(f"λ must be a number in [0, 1], got the bool {lam!r}")
    if isinstance(lam, (list, tuple)):
        lam = torch.as_tensor(lam, dtype=torch.float32)
    if isinstance(lam, torch.Tensor):
        if lam.dim() == 0:
            lam = float(lam)
        else:
            if not per_sample:
                raise ValueError(
                    "this method takes one λ for the whole batch (a float in [0, 1]); "
                    f"got a tensor of shape {tuple(lam.shape)}"
                )
            if lam.dim() != 1 or lam.numel() == 0:
                raise ValueError(
                    "a per-sample λ must be a non-empty 1-D tensor of shape (N,), "
                    f"got shape {tuple(lam.shape)}"
                )
            if not lam.is_floating_point():
                lam = lam.float()
            bad = torch.isnan(lam) | (lam < 0) | (lam > 1)
            if bool(bad.any()):
                raise ValueError(
                    f"every λ must be in [0, 1] and not NaN; got {lam[bad][:5].tolist()} "
                    f"({int(bad.sum())} bad values)"
                )
            return lam.detach()
    if not isinstance(lam, (int, float)):
        raise ValueError(f"λ must be a float in [0, 1] or a tensor of shape (N,), got {lam!r}")
    value = float(lam)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"λ must be in [0, 1] and not NaN, got {value!r}")
    return value


class Condition:
    """The current λ, shared by all conditioned layers of one model.

    ``encoder`` (optional) maps a (B,) tensor of λ to (B, D) features that layers such as FiLM
    read through :meth:`encoding`; it must have no parameters, so its output can be cached
    until λ changes.
    """

    def __init__(self, lam: Lambda = 0.0, *, per_sample: bool = True) -> None:
        self.per_sample_allowed = per_sample
        self.encoder: nn.Module | None = None
        self._cache: dict[tuple, torch.Tensor] = {}
        self._lam: Lambda = validate_lambda(lam, per_sample=per_sample)

    @property
    def lam(self) -> Lambda:
        return self._lam

    @lam.setter
    def lam(self, value: object) -> None:
        self._lam = validate_lambda(value, per_sample=self.per_sample_allowed)
        self._cache.clear()

    @contextlib.contextmanager
    def scalar(self, value: float) -> Iterator[None]:
        """Temporarily hold the scalar λ ``value`` (already validated: one of the values of the
        current per-sample λ); used to run one forward per λ group."""
        saved = self._lam
        self._lam = float(value)
        self._cache.clear()
        try:
            yield
        finally:
            self._lam = saved
            self._cache.clear()

    def set_encoder(self, encoder: nn.Module | None) -> None:
        if encoder is not None and any(True for _ in encoder.parameters()):
            raise ValueError("a λ encoder must have no parameters (its output is cached)")
        self.encoder = encoder
        self._cache.clear()

    @property
    def is_scalar(self) -> bool:
        return isinstance(self._lam, float)

    def check_batch(self, batch_size: int) -> None:
        """Raise if a per-sample λ does not have one entry per input sample."""
        if not self.is_scalar and self._lam.numel() != batch_size:
            raise ValueError(
                f"per-sample λ has {self._lam.numel()} entries but the batch has {batch_size} "
                "samples; set one λ per sample (or a float for the whole batch)"
            )

    @staticmethod
    def _key(*parts: object) -> tuple:
        # Tensors made under torch.inference_mode cannot be saved for a later backward, so
        # they are cached apart from those made outside it.
        return (*parts, torch.is_inference_mode_enabled())

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """λ as a (B,) tensor matching the leading dimension of ``x`` (B = 1 for a scalar λ).

        Some backbones fold extra items into the batch dimension (e.g. windows of Swin, in
        sample-major order); a per-sample λ is then repeated to that size.
        """
        key = self._key("values", x.shape[0], x.device, x.dtype)
        if key not in self._cache:
            if self.is_scalar:
                lam = torch.full((1,), self._lam, device=x.device, dtype=x.dtype)
            else:
                lam = self._lam.to(device=x.device, dtype=x.dtype)
                lam = _expand_to_batch(lam, x.shape[0])
            self._cache[key] = lam
        return self._cache[key]

    def clean_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean (B,) mask of the samples with λ == 0 (those routed to the clean branch)."""
        key = self._key("clean", x.shape[0], x.device)
        if key not in self._cache:
            self._cache[key] = self.values(x) == 0
        return self._cache[key]

    def encoding(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features of λ, (B, D) with B as in :meth:`values`."""
        if self.encoder is None:
            raise RuntimeError("this model's condition has no λ encoder")
        key = self._key("encoding", x.shape[0], x.device, x.dtype)
        if key not in self._cache:
            lam = self.values(x)
            self._cache[key] = self.encoder(lam).to(dtype=x.dtype)
        return self._cache[key]


def _expand_to_batch(lam: torch.Tensor, batch: int) -> torch.Tensor:
    n = lam.shape[0]
    if batch == n:
        return lam
    if batch % n:
        raise ValueError(
            f"a layer saw a batch of {batch} items, which is not a multiple of the {n} "
            "per-sample λ values"
        )
    return lam.repeat_interleave(batch // n)


@contextlib.contextmanager
def condition(model: ConditionalModel, lam: object) -> Iterator[ConditionalModel]:
    """Temporarily set λ on ``model``; the previous value is restored on exit.

    >>> with oat_plugins.condition(model, 0.3):
    ...     logits = model(x)
    """
    previous = model.lam
    model.set_lambda(lam)
    try:
        yield model
    finally:
        model.set_lambda(previous)
