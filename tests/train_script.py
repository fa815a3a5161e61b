"""Helper run as a subprocess by tests/test_train.py (not a test module).

    python tests/train_script.py OUT [--kill-at-step K | --pause-at-step K] [--resume]
    torchrun --nproc_per_node 2 tests/train_script.py OUT --ddp --interrupt-at S [--method M]

Trains a tiny model on the first bundled images with one intra-op thread. With --kill-at-step
the process SIGKILLs itself when the λ sampler is asked for step K (a real mid-epoch crash).
With --pause-at-step, at step K it prints ``paused at step K`` and waits for a line on stdin:
the test sends SIGTERM, then the line, so the signal arrives in the middle of step K; the run
prints ``stopped_by <what>`` when fit returns. With --ddp the script joins the process group
itself and trains twice: OUT/full uninterrupted, and OUT/resumed stopped after --interrupt-at
steps then resumed; for film, OUT/preempted is stopped by a SIGTERM that only rank 1 receives
during step --interrupt-at, then resumed, and OUT/unused trains one epoch with no λ = 0 sample
(unused clean norm branches); every rank writes OUT/<run>/rank<r>.pt with its final
state_dict and history.
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


class PausingSampler(DiscreteLambdaSampler):
    """OAT's sampler that, at its ``pause_at``-th call, announces it on stdout and waits for
    a line on stdin (the test signals the process before sending it)."""

    def __init__(self, pause_at: int) -> None:
        super().__init__()
        self.pause_at, self.calls = pause_at, 0

    def __call__(self, batch_size, generator=None):
        self.calls += 1
        if self.calls == self.pause_at:
            print(f"paused at step {self.calls}", flush=True)
            sys.stdin.readline()
        return super().__call__(batch_size, generator)


class SignallingSampler(DiscreteLambdaSampler):
    """OAT's sampler that sends its own process SIGTERM at its ``at``-th call on rank
    ``rank`` only (the other ranks must stop at the same step)."""

    def __init__(self, at: int, rank: int) -> None:
        super().__init__()
        self.at, self.rank, self.calls = at, rank, 0

    def __call__(self, batch_size, generator=None):
        self.calls += 1
        if self.calls == self.at and dist.get_rank() == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(batch_size, generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--pause-at-step", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--method", default="film")
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
        sampler = None
        if args.kill_at_step:
            sampler = KillingSampler(args.kill_at_step)
        elif args.pause_at_step:
            sampler = PausingSampler(args.pause_at_step)
        result = fit(tiny_model(), data, config(), args.out, resume=args.resume, sampler=sampler)
        print(f"stopped_by {result['stopped_by']}", flush=True)
        return

    dist.init_process_group("gloo")  # fit() joins an existing group and leaves it open
    rank = dist.get_rank()
    out = Path(args.out)
    runs = []
    full = tiny_model(method=args.method)
    runs.append(("full", full, fit(full, data, config(), out / "full")))
    fit(tiny_model(method=args.method), data, config(max_steps=args.interrupt_at),
        out / "resumed")
    resumed = tiny_model(seed=7, method=args.method)
    runs.append(("resumed", resumed, fit(resumed, data, config(), out / "resumed", resume=True)))
    if args.method == "film":
        # SIGTERM reaches rank 1 only, during step --interrupt-at: both ranks stop after it.
        stopped = fit(tiny_model(), data, config(), out / "preempted",
                      sampler=SignallingSampler(args.interrupt_at, rank=1))
        torch.save({"stopped_by": stopped["stopped_by"], "global_step": stopped["global_step"]},
                   out / "preempted" / f"stop{rank}.pt")
        preempted = tiny_model(seed=11)
        runs.append(("preempted", preempted,
                     fit(preempted, data, config(), out / "preempted", resume=True)))
        # No λ = 0 sample anywhere: the clean norm branches get no gradient (DDP must cope).
        lambdas = (0.5, 1.0)
        unused = tiny_model(encoding="sinusoidal")  # continuous codes: any λ set trains them
        runs.append(("unused", unused, fit(
            unused, data, config(lambdas=lambdas, clean_fraction=0.0, epochs=1), out / "unused")))
    for name, model, result in runs:
        torch.save({"state_dict": model.state_dict(), "history": result["history"]},
                   out / name / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
