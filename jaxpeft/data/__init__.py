"""Data for fine-tuning: record formats (`formats`) and sources (`sources`), records (`records`), their
tokenization with a loss mask (`encode`, targets of the TRL formats in `targets`), batching (`batching`), a
look at the encoded data (`preview`) and the bundled task generators (`tasks`)."""

from jaxpeft.data.batching import Batcher, empty_batch, ordered_batches
from jaxpeft.data.encode import EncodeStats, encode_example, encode_records, eval_prompts, pad_id_of
from jaxpeft.data.records import Record, holdout_split, load_records, normalize_records, record_format
from jaxpeft.data.targets import TRAIN_ON, use_chat_template_file

__all__ = ["TRAIN_ON", "Batcher", "EncodeStats", "Record", "empty_batch", "encode_example", "encode_records",
           "eval_prompts", "holdout_split", "load_records", "normalize_records", "ordered_batches", "pad_id_of",
           "record_format", "use_chat_template_file"]
