"""Helper run as a subprocess by tests/test_train.py (not a test module).

    python tests/train_script.py OUT [--kill-at-step K] [--resume]
    torchrun --nproc_per_node 2 tests/train_script.py OUT --ddp --interrupt-at S

Trains a tiny film model on the first bundled images with one intra-op thread. With
--kill-at-step the process SIGKILLs itself when the λ sampler is asked for step K (a real
mid-epoch interruption). With --ddp the script joins the process group itself and trains
twice: OUT/full uninterrupted, and OUT/resumed stopped after --interrupt-at steps then resumed;
then OUT/unused trains one epoch with no λ = 0 sample (unused clean norm branches); every rank
writes OUT/<run>/rank<r>.pt with its final state_dict and history.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.fspath(Path(__file__).resolve().parent))
from train_helpers import tiny_config, tiny_data, tiny_model  # noqa: E402

from oat_plugins.samplers import DiscreteLambdaSampler  # noqa: E402
from oat_plugins.train import fit  # noqa: E402


class KillingSampler(DiscreteLambdaSampler):
    """OAT's sampler that SIGKILLs the process at its ``kill_at``-th call (1-based)."""

    def __init__(self, kill_at: int) -> None:
        super().__init__()
        self.kill_at, self.calls = kill_at, 0

    def __call__(self, batch_size, generator=None):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch_size, generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--interrupt-at", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = tiny_data(args.n_train)

    def config(**overrides):
        return tiny_config(**{"epochs": args.epochs, "batch_size": args.batch_size, **overrides})

    if not args.ddp:
        sampler = KillingSampler(args.kill_at_step) if args.kill_at_step else None
        fit(tiny_model(), data, config(), args.out, resume=args.resume, sampler=sampler)
        return

    dist.init_process_group("gloo")  # fit() joins an existing group and leaves it open
    rank = dist.get_rank()
    out = Path(args.out)
    full = tiny_model()
    full_result = fit(full, data, config(), out / "full")
    fit(tiny_model(), data, config(max_steps=args.interrupt_at), out / "resumed")
    resumed = tiny_model(seed=7)
    resumed_result = fit(resumed, data, config(), out / "resumed", resume=True)
    # No λ = 0 sample anywhere: the clean norm branches get no gradient (DDP must cope).
    unused = tiny_model(encoding="sinusoidal")  # orthogonal codes would need λ = 0 trained
    unused_result = fit(unused, data, config(lambdas=(0.5, 1.0), clean_fraction=0.0, epochs=1),
                        out / "unused")
    for name, model, result in (("full", full, full_result),
                                ("resumed", resumed, resumed_result),
                                ("unused", unused, unused_result)):
        torch.save({"state_dict": model.state_dict(), "history": result["history"]},
                   out / name / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
