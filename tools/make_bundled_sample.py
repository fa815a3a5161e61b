"""Build ``oat_plugins/data/cifar10_sample.npz``, the small CIFAR-10 sample shipped in the package.

Reads the CIFAR-10 JPEG archive (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``; 32x32
RGB, JPEG quality 75) and keeps, for a class-balanced seeded selection, the ORIGINAL JPEG bytes
(no re-encoding). The .npz holds, per split: ``<split>_jpeg`` (uint8, all files concatenated),
``<split>_offsets`` (int64, N + 1; file i is ``jpeg[offsets[i]:offsets[i+1]]``),
``<split>_labels`` (int64), plus ``classes`` (unicode array) and a ``source`` note.

Usage::

    python tools/make_bundled_sample.py [--archive ../shared/data/cifar10-jpeg.tar.gz]
        [--train-per-class 400] [--test-per-class 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUT = ROOT / "oat_plugins" / "data" / "cifar10_sample.npz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")


def read_archive(path: Path) -> dict[str, dict[str, list[tuple[str, bytes]]]]:
    """{split: {class: [(name, jpeg bytes), ...] sorted by name}}."""
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or not parts[2].endswith(".jpg"):
                continue
            split, cls, name = parts
            if cls not in CLASSES:
                raise ValueError(f"unexpected class folder {cls!r} in {path}")
            data = tar.extractfile(member).read()
            files.setdefault(split, {}).setdefault(cls, []).append((name, data))
    for split in files.values():
        for items in split.values():
            items.sort()
    return files


def select(per_class: dict[str, list[tuple[str, bytes]]], n: int, rng: np.random.Generator):
    """Seeded class-balanced selection, shuffled so any prefix is roughly balanced too."""
    chosen: list[tuple[bytes, int]] = []
    for label, cls in enumerate(CLASSES):
        items = per_class[cls]
        if len(items) < n:
            raise ValueError(f"class {cls!r} has {len(items)} images, fewer than {n}")
        for i in sorted(rng.choice(len(items), size=n, replace=False)):
            chosen.append((items[i][1], label))
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


def pack(chosen: list[tuple[bytes, int]]) -> dict[str, np.ndarray]:
    lengths = np.array([len(b) for b, _ in chosen], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    jpeg = np.frombuffer(b"".join(b for b, _ in chosen), dtype=np.uint8)
    labels = np.array([y for _, y in chosen], dtype=np.int64)
    return {"jpeg": jpeg, "offsets": offsets, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    files = read_archive(args.archive)
    rng = np.random.default_rng(args.seed)
    arrays: dict[str, np.ndarray] = {"classes": np.array(CLASSES, dtype="<U16")}
    for split, n in (("train", args.train_per_class), ("test", args.test_per_class)):
        for key, value in pack(select(files[split], n, rng)).items():
            arrays[f"{split}_{key}"] = value
    arrays["source"] = np.array(
        f"CIFAR-10 (Krizhevsky, 2009), JPEG q75 mirror; {args.train_per_class}/class train, "
        f"{args.test_per_class}/class test, seed {args.seed}; original JPEG bytes"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): "
          f"{len(arrays['train_labels'])} train, {len(arrays['test_labels'])} test images")


if __name__ == "__main__":
    main()
