"""oat-plugins: once-for-all conditional robustness for any timm backbone.

>>> import timm, oat_plugins
>>> model = oat_plugins.wrap(timm.create_model("resnet18", num_classes=10), method="film")
>>> model.set_lambda(0.3)          # 0: clean accuracy ... 1: robustness
>>> plain = model.export(0.3)      # a plain timm model with the same output at λ = 0.3
"""

from . import _timm  # noqa: F401  (first: timm imported without torchvision's warning)
from ._version import __version__
from .condition import Condition, condition, validate_lambda
from .evaluate import SweepResult, evaluate
from .exported import load_exported, save_exported
from .methods import Method, available_methods, get_method, register_method
from .model import ConditionalModel, load, save, wrap
from .surgery import NothingToConditionError

__all__ = [
    "Condition",
    "ConditionalModel",
    "Method",
    "NothingToConditionError",
    "SweepResult",
    "__version__",
    "available_methods",
    "condition",
    "evaluate",
    "get_method",
    "load",
    "load_exported",
    "register_method",
    "save",
    "save_exported",
    "validate_lambda",
    "wrap",
]
