"""PEFT methods, each registered by name (see `base.Method`; `builtins.register_builtins` registers them)."""

from jaxpeft.methods import bottleneck, full, ia3, lora, prefix, prompt
from jaxpeft.methods.base import METHODS, Method, get_method, register
from jaxpeft.methods.builtins import register_builtins
from jaxpeft.methods.folders import load_adapter, method_of_folder

__all__ = ["METHODS", "Method", "get_method", "load_adapter", "method_of_folder", "register", "register_builtins",
           "lora", "full", "ia3", "bottleneck", "prefix", "prompt"]
