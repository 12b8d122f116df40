"""Many adapters on one base: held and switched (registry), summed, and one per row in a batch (batched)."""

from jaxpeft.multi.batched import BASE, StackedLora, per_example_generate, per_example_logits, stack
from jaxpeft.multi.registry import AdapterRegistry
from jaxpeft.multi.stack import gather_rows, stack_adapters, sum_adapters

__all__ = ["BASE", "AdapterRegistry", "StackedLora", "gather_rows", "per_example_generate",
           "per_example_logits", "stack", "stack_adapters", "sum_adapters"]
