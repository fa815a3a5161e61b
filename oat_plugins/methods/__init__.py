"""Conditioning methods. Importing this package registers every built-in method."""

from . import film  # noqa: F401  (registers 'film')
from .base import Method, available_methods, get_method, register_method

__all__ = ["Method", "available_methods", "get_method", "register_method"]
