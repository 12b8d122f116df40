"""Data for fine-tuning: records (`records`), their tokenization with a loss mask (`encode`), batching
(`batching`) and the bundled task generators (`tasks`)."""

from jaxpeft.data.batching import Batcher, empty_batch, ordered_batches
from jaxpeft.data.encode import EncodeStats, encode_example, encode_records, eval_prompts, pad_id_of
from jaxpeft.data.records import Record, holdout_split, load_records, normalize_records

__all__ = ["Batcher", "EncodeStats", "Record", "empty_batch", "encode_example", "encode_records", "eval_prompts",
           "holdout_split", "load_records", "normalize_records", "ordered_batches", "pad_id_of"]
