"""Keep glibc from handing freed memory back to the OS between training steps on a CPU.

A conditioned layer computes a new weight-sized tensor every training forward (FLOAT's
W + λ·α·η, a masked weight), and a training step frees and reallocates its activations. With
glibc's default thresholds, large freed blocks are trimmed from the heap or unmapped, so the
next step page-faults the same amount of memory in again: measured on resnet18 (32², batch 32,
1 thread, ``bench/weight_ab.py``), convolving a fresh copy of each weight cost 1.29× the plain
forward + backward with the defaults and 1.03× with the thresholds below, and float's training
forward + backward went from 1.38× to 1.13× plain (bench/RESULTS.md §1). PyTorch's CUDA
caching allocator makes this moot on a GPU; jemalloc or tcmalloc (``LD_PRELOAD``) have the same
effect on a CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

OPT_OUT_ENV = "OAT_PLUGINS_TUNE_MALLOC"
"""Set to ``0`` to leave the C allocator's settings alone."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed memory at the top of the heap
_MMAP_THRESHOLD = 32 << 20  # serve blocks up to 32 MiB (glibc's maximum) from the heap

_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (once), so that memory freed by
    one training step is reused by the next instead of being returned to the OS and faulted in
    again. A process-wide setting of the C allocator: it only changes how much freed memory
    the process keeps (at most about its peak use). Returns whether it applies: False off
    Linux/glibc, or with ``OAT_PLUGINS_TUNE_MALLOC=0``."""
    global _tuned
    if _tuned is None:
        _tuned = _apply()
    return _tuned


def _apply() -> bool:
    if os.environ.get(OPT_OUT_ENV, "") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no mallopt thresholds)
        applied = (libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
                   and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1)
    except (OSError, AttributeError):
        return False
    if applied:
        logger.debug("glibc malloc: trim threshold 1 GiB, mmap threshold 32 MiB (%s=0 to "
                     "opt out)", OPT_OUT_ENV)
    return applied
