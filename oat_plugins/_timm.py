"""timm, imported once, first, without torchvision's deprecation noise.

torchvision 0.29 (imported by timm) uses ``torch.jit.interface``, deprecated in torch 2.14: a
FutureWarning our users cannot act on. The package's ``__init__`` imports this module first, so
every later ``import timm`` in the package (or the user's code) finds it imported.
"""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*torch.jit.interface", category=FutureWarning)
    import timm  # noqa: F401  (re-exported)

__all__ = ["timm"]
