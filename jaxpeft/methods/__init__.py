"""PEFT methods, each registered by name (see `base.Method`)."""

from jaxpeft.methods import bottleneck, full, ia3, lora, prefix, prompt
from jaxpeft.methods.base import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register", "lora", "full", "ia3", "bottleneck", "prefix", "prompt"]
