"""Quick start: wrap a timm backbone, train it once-for-all for a few steps on the bundled
CIFAR-10 sample, sweep λ, export a plain model and check it matches.

    python examples/quickstart.py            # about a minute on a 2-core CPU

A few steps only show the API; `oat-plugins demo` trains long enough to see the trade-off.
"""

import tempfile

import timm
import torch

import oat_plugins
from oat_plugins.data import CIFAR10_MEAN, CIFAR10_STD, bundled_cifar10
from oat_plugins.train import TrainConfig, fit

backbone = timm.create_model("resnet10t", num_classes=10, channels=(16, 32, 64, 128))
model = oat_plugins.wrap(backbone, "film", normalize=(CIFAR10_MEAN, CIFAR10_STD),
                         model_kwargs={"channels": (16, 32, 64, 128)})
print(model.summary())

out = tempfile.mkdtemp(prefix="oat-quickstart-")
config = TrainConfig(epochs=1, batch_size=64, steps=2, max_steps=20, progress=False)
fit(model, bundled_cifar10("train"), config, out)

sweep = oat_plugins.evaluate(model, bundled_cifar10("test"), [0.0, 0.5, 1.0],
                             steps=5, n_examples=128, progress=False)
print(sweep.to_markdown())

x = torch.stack([bundled_cifar10("test")[i][0] for i in range(8)])
plain = model.export(0.5).eval()
with torch.no_grad(), oat_plugins.condition(model, 0.5):
    print("export matches:", torch.allclose(plain(x), model.eval()(x), atol=1e-4))
oat_plugins.save(model, f"{out}/model.pt")
print("saved to", f"{out}/model.pt")
