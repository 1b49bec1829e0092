"""Methods: one module and one config dataclass each, registered by name.

Every module of this package is imported here (in name order), so a module that defines and registers a method
(:func:`.base.register_method`) is all a new method needs; see README, "Adding a method".
"""
import importlib
import pkgutil

from .base import METHODS, Method, MethodConfig, cli_options, config_from_dict, make_config, method_class


def discover() -> list:
    """Import every module of this package (modules on ``__path__``, name order); returns their names."""
    names = sorted({m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")})
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()

__all__ = ["METHODS", "Method", "MethodConfig", "cli_options", "config_from_dict", "discover", "make_config",
           "method_class"]
