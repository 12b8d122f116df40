"""The one explicit registration of the built-in methods and the model hooks they bring (`import jaxpeft`
calls `register_builtins`; nothing registers itself on import)."""

from __future__ import annotations

from jaxpeft.methods import bottleneck, full, ia3, lora, prefix, prompt
from jaxpeft.methods.base import register
from jaxpeft.models import hooks


def register_builtins() -> None:
    """Registers every built-in method by name and its hooks into the model (idempotent)."""
    for method in (bottleneck.Adapters(), full.Full(), ia3.IA3(), lora.Lora(), prefix.Prefix(), prompt.Prompt()):
        register(method)
    for linear in (lora.LINEAR_HOOK, *ia3.LINEAR_HOOKS):
        hooks.register_linear(linear)
    hooks.register_param(lora.PARAM_HOOK)
    for residual in bottleneck.RESIDUAL_HOOKS:
        hooks.register_residual(residual)
    for source in (prompt.VIRTUAL_SOURCE, prefix.VIRTUAL_SOURCE):
        hooks.register_virtual(source)
