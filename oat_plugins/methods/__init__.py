"""Conditioning methods. Importing this package registers every built-in method."""

from . import film, float, smart  # noqa: F401  (registers film, float, floats, smart)
from .base import Method, available_methods, get_method, register_method

__all__ = ["Method", "available_methods", "get_method", "register_method"]
