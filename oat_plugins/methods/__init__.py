"""Conditioning methods. Importing this package registers every built-in method."""

from . import film, float, multiexit, smart  # noqa: F401  (registers the built-in methods)
from .base import Method, available_methods, get_method, register_method

__all__ = ["Method", "available_methods", "get_method", "register_method"]
