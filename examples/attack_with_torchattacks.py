"""Any torchattacks attack runs on a conditional model at a chosen λ, unchanged: the model
takes one argument (images in [0, 1]) and returns logits.

    python examples/attack_with_torchattacks.py [model.pt]

Without a checkpoint a randomly initialised model is used (accuracies are then meaningless;
the point is the API).
"""

import sys

import timm
import torch
import torchattacks

import oat_plugins
from oat_plugins.data import bundled_cifar10

if len(sys.argv) > 1:
    model = oat_plugins.load(sys.argv[1])
else:
    model = oat_plugins.wrap(timm.create_model("resnet10t", num_classes=10), "float").eval()

test = bundled_cifar10("test")
x = torch.stack([test[i][0] for i in range(64)])
y = torch.tensor([test[i][1] for i in range(64)])
for lam in (0.0, 1.0):
    with oat_plugins.condition(model, lam):
        attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)
        x_adv = attack(x, y)
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
            robust = (model(x_adv).argmax(1) == y).float().mean().item()
    print(f"λ={lam}: clean {100 * clean:.1f} %, PGD-10 {100 * robust:.1f} %")
