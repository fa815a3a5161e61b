"""``oat_plugins._malloc``: glibc keeps freed memory for the next training step on a CPU."""

import sys

import pytest

from oat_plugins import _malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_thresholds_apply_on_glibc_and_the_opt_out_is_respected(monkeypatch):
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert _malloc._apply() is True
    monkeypatch.setenv(_malloc.OPT_OUT_ENV, "0")
    assert _malloc._apply() is False


def test_fit_on_a_cpu_tunes_the_allocator_once(tmp_path, monkeypatch):
    import torch
    from torch.utils.data import TensorDataset

    import oat_plugins
    from oat_plugins.train import TrainConfig, fit

    monkeypatch.setattr(_malloc, "_tuned", None)
    model = oat_plugins.wrap("resnet10t", "float", recipe="reference", model_kwargs={
        "num_classes": 10, "channels": (8, 16, 16, 16), "stem_width": 8})
    data = TensorDataset(torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    fit(model, data, TrainConfig(epochs=1, batch_size=8, steps=1, max_steps=1, device="cpu",
                                 log_every=0, progress=False), tmp_path)
    assert _malloc._tuned is _malloc._apply()
