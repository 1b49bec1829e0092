"""Methods: one module and one config dataclass each, registered by name."""
from . import apt, fl, lora, lt, prefix, probe, prompt, sk  # noqa: F401  (registration)
from .base import METHODS, Method, MethodConfig, cli_options, config_from_dict, make_config, method_class

__all__ = ["METHODS", "Method", "MethodConfig", "cli_options", "config_from_dict", "make_config", "method_class"]
