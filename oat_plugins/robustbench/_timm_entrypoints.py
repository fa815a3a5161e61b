"""Holder module for the timm entry points created by :func:`oat_plugins.robustbench.register`.

timm's ``register_model`` files each entry point under the module that defines it; the
functions made at run time are attached here so they do not clutter the public modules.
"""

__all__: list[str] = []
