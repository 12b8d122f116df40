"""The method comparison: every method trained in its own process on one model, task and budget
(`harness`), generation speed (`speed`), the report (`report`), child processes and their peak memory
(`children`), and the 7B adapter-size table (`sizes`). `python -m experiments.compare` is its entry point."""

from jaxpeft.compare.children import ChildRun, own_peak_rss_bytes, run_child
from jaxpeft.compare.harness import (METHOD_ORDER, SPECS, CompareConfig, MethodSpec, base_metrics, folder_bytes,
                                     lr_choice_text, lr_text, prepare_out, run_argv, run_comparison, run_trainings,
                                     selection_key, summarize_run, train_tokens_per_s)
from jaxpeft.compare.sizes import REFERENCE_7B_MB, adapter_size_table, lora_adapter_size

__all__ = ["METHOD_ORDER", "REFERENCE_7B_MB", "SPECS", "ChildRun", "CompareConfig", "MethodSpec", "adapter_size_table",
           "base_metrics", "folder_bytes", "lora_adapter_size", "lr_choice_text", "lr_text", "own_peak_rss_bytes",
           "prepare_out", "run_argv", "run_child", "run_comparison", "run_trainings", "selection_key",
           "summarize_run", "train_tokens_per_s"]
