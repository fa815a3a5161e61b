"""The one compatibility layer between oat-plugins and robustbench 1.1.1 / pyautoattack 0.2.0.

Why it exists (checked with the versions pinned by the ``robustbench`` extra):

* ``robustbench.eval`` does ``from autoattack import AutoAttack`` and
  ``from autoattack.state import EvaluationState``. PyPI's ``pyautoattack`` (robustbench's
  declared dependency) installs the module ``pyautoattack`` instead, with a different API:
  keyword-only ``batch_size=`` instead of ``bs=``, no ``log_path``, and
  ``run_standard_evaluation`` returns ``(x_adv, y_adv)`` instead of ``x_adv``.
* ``robustbench.loaders`` does ``import pkg_resources``, which setuptools >= 81 no longer ships.

What :func:`install` does, and nothing else:

1. If an ``autoattack`` module with the original API (``AutoAttack(..., log_path=...)`` and
   ``run_standard_evaluation(x, y, bs=...)``) is importable, it changes nothing for it.
   Otherwise it imports robustbench while two *temporary* entries, ``autoattack`` and
   ``autoattack.state``, sit in :data:`sys.modules`; they point at :class:`AutoAttack` below
   (the original API implemented on top of ``pyautoattack``) and at
   ``pyautoattack.state``. The entries are removed again as soon as robustbench is imported,
   so ``import autoattack`` elsewhere behaves exactly as before.
2. If ``pkg_resources`` cannot be imported, a minimal temporary stand-in (only
   ``resource_filename``, the one function robustbench uses) is present during the same
   import and removed afterwards. setuptools' deprecation warning for ``pkg_resources`` and
   timm's for the old import paths robustbench uses are silenced during that import only.
3. If robustbench is already imported and working, it does nothing at all.

It is idempotent and cheap after the first call. ``import oat_plugins`` never imports
robustbench, autoattack or pyautoattack; the functions of :mod:`oat_plugins.robustbench`
that need them call :func:`install` themselves. Users who want plain
``import robustbench`` to work call it once first::

    from oat_plugins.robustbench import compat
    compat.install()
    import robustbench  # now works with robustbench 1.1.1 + pyautoattack 0.2.0
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
import types
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._device import model_device

__all__ = ["install", "is_installed", "native_autoattack", "autoattack_class"]

logger = logging.getLogger(__name__)

_INSTALLED = False

_INSTALL_HINT = (
    "robustbench support needs the optional dependencies: "
    'pip install "oat-plugins[robustbench]" (robustbench==1.1.1, pyautoattack>=0.2.0, '
    "setuptools<81)."
)


def _has_original_api(module: types.ModuleType) -> bool:
    """True when ``module.AutoAttack`` has the original (fra31/auto-attack) signatures."""
    cls = getattr(module, "AutoAttack", None)
    if cls is None:
        return False
    try:
        init_params = inspect.signature(cls.__init__).parameters
        run_params = inspect.signature(cls.run_standard_evaluation).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "log_path" in init_params and "bs" in run_params


def native_autoattack() -> types.ModuleType | None:
    """The installed ``autoattack`` module if it has the original API, else ``None``."""
    if importlib.util.find_spec("autoattack") is None:
        return None
    try:
        module = importlib.import_module("autoattack")
    except Exception:  # a broken install is treated as absent
        logger.debug("autoattack is installed but cannot be imported", exc_info=True)
        return None
    return module if _has_original_api(module) else None


def _pyautoattack() -> types.ModuleType:
    try:
        return importlib.import_module("pyautoattack")
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err


def _make_adapter() -> type:
    base = _pyautoattack().AutoAttack

    class AutoAttack(base):  # type: ignore[misc, valid-type]
        """The original ``autoattack.AutoAttack`` API on top of ``pyautoattack.AutoAttack``.

        Same constructor and methods as fra31/auto-attack (``norm``, ``eps``, ``seed``,
        ``verbose``, ``attacks_to_run``, ``version``, ``device``, ``log_path``;
        ``run_standard_evaluation(x, y, bs=250, return_labels=False, state_path=None)``
        returning ``x_adv``). Attacks and their settings are pyautoattack's (identical to the
        reference for ``version='standard'``). ``device=None`` means the model's device.
        ``log_path`` appends the attack log to that file for the duration of each run.
        """

        def __init__(
            self,
            model: torch.nn.Module,
            norm: str = "Linf",
            eps: float = 0.3,
            seed: int | None = None,
            verbose: bool = True,
            attacks_to_run: Sequence[str] = (),
            version: str = "standard",
            is_tf_model: bool = False,
            device: torch.device | str | None = None,
            log_path: str | None = None,
        ) -> None:
            if is_tf_model:
                raise NotImplementedError("pyautoattack does not support TensorFlow models")
            if device is None:
                device = model_device(model)
            attacks = list(attacks_to_run) if version == "custom" else None
            super().__init__(model, attacks=attacks, device=device, eps=eps, norm=norm,
                             seed=seed, version=version)
            self.verbose = verbose
            self.log_path = log_path

        @contextmanager
        def _log_to_file(self) -> Iterator[None]:
            if not self.log_path:
                yield
                return
            handler = logging.FileHandler(self.log_path)
            handler.setFormatter(logging.Formatter("%(message)s"))
            old_level = self.logger.level
            self.logger.addHandler(handler)
            self.logger.setLevel(logging.DEBUG)
            try:
                yield
            finally:
                self.logger.removeHandler(handler)
                self.logger.setLevel(old_level)
                handler.close()

        def run_standard_evaluation(  # type: ignore[override]
            self,
            x_orig: torch.Tensor,
            y_orig: torch.Tensor,
            bs: int = 250,
            return_labels: bool = False,
            state_path: str | Path | None = None,
        ) -> Any:
            if state_path is not None:
                state_path = Path(state_path)
            with self._log_to_file():
                x_adv, y_adv = super().run_standard_evaluation(
                    x_orig, y_orig, batch_size=bs, state_path=state_path)
            return (x_adv, y_adv) if return_labels else x_adv

        def run_standard_evaluation_individual(  # type: ignore[override]
            self,
            x_orig: torch.Tensor,
            y_orig: torch.Tensor,
            bs: int = 250,
            return_labels: bool = False,
        ) -> dict:
            with self._log_to_file():
                adv = super().run_standard_evaluation_individual(x_orig, y_orig, batch_size=bs)
            return adv if return_labels else {k: v[0] for k, v in adv.items()}

    AutoAttack.__module__ = __name__
    AutoAttack.__qualname__ = "AutoAttack"
    return AutoAttack


_ADAPTER: type | None = None


def autoattack_class() -> type:
    """The ``AutoAttack`` class with the original API: the native one if installed, else
    the adapter over pyautoattack (see the module docstring)."""
    global _ADAPTER
    native = native_autoattack()
    if native is not None:
        return native.AutoAttack
    if _ADAPTER is None:
        _ADAPTER = _make_adapter()
    return _ADAPTER


def __getattr__(name: str) -> Any:  # lazy ``compat.AutoAttack`` without importing at import
    if name == "AutoAttack":
        return autoattack_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pkg_resources_standin() -> types.ModuleType:
    from importlib import resources

    def resource_filename(package: str, resource: str) -> str:
        return str(resources.files(package).joinpath(resource))

    module = types.ModuleType("pkg_resources")
    module.resource_filename = resource_filename  # type: ignore[attr-defined]
    module.__doc__ = "Temporary stand-in installed by oat_plugins.robustbench.compat."
    return module


@contextmanager
def _temporary_modules(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """Put ``modules`` in sys.modules for the duration, restoring what was there before."""
    sentinel = object()
    previous = {name: sys.modules.get(name, sentinel) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, old in previous.items():
            if old is sentinel:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old  # type: ignore[assignment]


def _robustbench_works() -> bool:
    module = sys.modules.get("robustbench")
    return module is not None and "robustbench.eval" in sys.modules and hasattr(module, "benchmark")


def is_installed() -> bool:
    """True once robustbench has been imported successfully (by :func:`install` or not)."""
    return _robustbench_works()


def install() -> types.ModuleType:
    """Make ``import robustbench`` work and return the imported ``robustbench`` module.

    Idempotent; a no-op when robustbench is already imported or imports on its own with a
    native ``autoattack``. Raises ImportError with an install hint when robustbench or
    pyautoattack is missing.
    """
    global _INSTALLED
    if _robustbench_works():
        _INSTALLED = True
        return sys.modules["robustbench"]
    if importlib.util.find_spec("robustbench") is None:
        raise ImportError(_INSTALL_HINT)

    temporary: dict[str, types.ModuleType] = {}
    if native_autoattack() is None:
        pyaa = _pyautoattack()
        state = importlib.import_module("pyautoattack.state")
        shim = types.ModuleType("autoattack")
        shim.__doc__ = "Temporary alias installed by oat_plugins.robustbench.compat."
        shim.AutoAttack = autoattack_class()  # type: ignore[attr-defined]
        shim.state = state  # type: ignore[attr-defined]
        shim.__version__ = getattr(pyaa, "__version__", "")  # type: ignore[attr-defined]
        temporary["autoattack"] = shim
        temporary["autoattack.state"] = state
        logger.debug("robustbench imported with autoattack -> pyautoattack adapter")
    if importlib.util.find_spec("pkg_resources") is None:
        temporary["pkg_resources"] = _pkg_resources_standin()

    with _temporary_modules(temporary), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pkg_resources")
        # robustbench 1.1.1 imports timm through paths timm deprecated; not the user's concern
        warnings.filterwarnings("ignore", message="Importing from timm",
                                category=DeprecationWarning)
        module = importlib.import_module("robustbench")
        importlib.import_module("robustbench.eval")
    _INSTALLED = True
    return module
