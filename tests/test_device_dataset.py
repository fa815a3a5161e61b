"""DeviceImageDataset: batch-wise augmentation on the data's device, and fit training on it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from oat_plugins.data import (
    DeviceImageDataset,
    TensorImageDataset,
    dataset_labels,
    random_crop_flip,
)
from oat_plugins.train import _pin_memory, fit
from tests.train_helpers import BATCH, tiny_config, tiny_data, tiny_model


def _candidates(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of ``image`` after zero padding, and its mirror image (torchvision ops)."""
    h, w = image.shape[-2:]
    padded = v2.functional.pad(image, [padding])
    crops = [v2.functional.crop(padded, top, left, h, w)
             for top in range(2 * padding + 1) for left in range(2 * padding + 1)]
    return crops + [v2.functional.horizontal_flip(c) for c in crops]


def test_random_crop_flip_gives_one_padded_crop_or_its_mirror_per_image():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 6, 5), dtype=torch.uint8)  # no zeros: pads show
    out = random_crop_flip(images, 2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    picks = []
    for image, crop in zip(images, out, strict=True):
        matches = [i for i, c in enumerate(_candidates(image, 2)) if torch.equal(c, crop)]
        assert matches, "an output is no crop of its own padded image"
        picks.append(matches[0])
    assert len(set(picks)) > 20  # offsets and flips are drawn per image, not per batch
    assert any(p >= 25 for p in picks) and any(p < 25 for p in picks)


def test_random_crop_flip_without_flip_never_mirrors():
    torch.manual_seed(1)
    images = torch.randint(1, 256, (32, 3, 6, 6), dtype=torch.uint8)
    for image, crop in zip(images, random_crop_flip(images, 1, flip=False), strict=True):
        assert any(torch.equal(c, crop) for c in _candidates(image, 1)[:9])


def test_device_dataset_batches_match_the_per_sample_view():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10) % 3
    data = DeviceImageDataset(images, labels, device="cpu")
    as_float = TensorImageDataset(images, labels)  # the unaugmented CPU path, bit for bit
    x, y = next(iter(DataLoader(Subset(data, [7, 2, 5]), batch_size=3)))
    assert torch.equal(x, torch.stack([as_float[i][0] for i in (7, 2, 5)]))
    assert y.tolist() == [1, 2, 2]
    image, label = data[4]
    assert torch.equal(image, as_float[4][0]) and label == 1
    assert torch.equal(dataset_labels(data), labels)


def test_device_dataset_augmentation_is_seeded_by_torch():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    data = DeviceImageDataset(images, torch.zeros(16, dtype=torch.long), augment=True)
    torch.manual_seed(3)
    first = data.batch(torch.arange(16))[0]
    torch.manual_seed(3)
    assert torch.equal(data.batch(torch.arange(16))[0], first)
    assert not torch.equal(first, DeviceImageDataset(images, torch.zeros(16)).batch(
        torch.arange(16))[0])


def test_device_dataset_rejects_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        DeviceImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))


class _OnGPU(Dataset):
    """A dataset declaring that it yields tensors on the GPU (nothing is allocated there)."""

    device = torch.device("cuda", 0)


def test_pinning_is_for_host_data_of_cuda_runs_only():
    host = DeviceImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8),
                              torch.zeros(2, dtype=torch.long))
    cuda = torch.device("cuda")
    assert _pin_memory(host, cuda) and _pin_memory(Subset(host, [0]), cuda)
    assert not _pin_memory(host, torch.device("cpu"))
    assert not _pin_memory(_OnGPU(), cuda) and not _pin_memory(Subset(_OnGPU(), [0]), cuda)


def test_fit_trains_on_a_device_dataset(tmp_path):
    source = tiny_data()
    images = (torch.stack([source[i][0] for i in range(len(source))]) * 255).round()
    labels = torch.tensor([source[i][1] for i in range(len(source))])
    data = DeviceImageDataset(images.to(torch.uint8), labels, device="cpu", augment=True)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, data, tiny_config(epochs=1), tmp_path)
    assert result["global_step"] == len(data) // BATCH
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
