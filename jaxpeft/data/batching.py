"""Batching of encoded examples into fixed-shape numpy arrays: the resumable training stream
(`Batcher`) and one ordered pass for evaluation (`ordered_batches`). Both fill a batch the same way.

Loss-mask convention: see jaxpeft/data/encode.py (loss_mask[b, t] == 1: token t is a target).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxpeft.core.errors import ConfigError, DataError


class Batcher:
    """Deterministic, resumable iterator of fixed-shape numpy batches of encoded examples.

    Examples are read as an endless stream: epoch e visits all examples in the order of a
    permutation seeded with `seed + e`, and a batch may straddle two epochs. The state is
    `{"epoch": e, "position": p}` (the next example is permutation_e[p]); a Batcher restored
    to a state yields exactly the batches that followed it.

    Each batch is a dict of numpy arrays:
      input_ids_BxS int32 (right-padded with pad_id), loss_mask_BxS int32 (module docstring:
      1 where input_ids[b, t] is a target predicted from t - 1), attention_mask_BxS int32
      (1 = real token). With `pack=True` each row holds several whole examples, and the batch
      also has segment_ids_BxS int32 (1, 2, 3... per example in the row, 0 = padding) and
      positions_BxS int32 (restarting at 0 in each example, 0 on padding); mask attention where
      segment ids differ. A packed example's first token is never a target (loss_mask 0), so no loss
      crosses an example boundary.
    """

    def __init__(
        self,
        examples: Sequence[Mapping],
        *,
        batch_size: int,
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        pack: bool = False,
    ) -> None:
        if not examples:
            raise DataError("Batcher got no examples; the dataset is empty after encoding.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1; got {batch_size}.")
        too_long = [i for i, e in enumerate(examples) if len(e["input_ids"]) > seq_len]
        if too_long:
            raise ConfigError(
                f"{len(too_long)} examples are longer than seq_len={seq_len} (first: "
                f"{too_long[:5]}). Encode them with the same seq_len as the Batcher."
            )
        self._ids = [np.asarray(e["input_ids"], np.int32) for e in examples]
        self._mask = [np.asarray(e["loss_mask"], np.int32) for e in examples]
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.seed, self.pack = seed, pack
        self._epoch, self._position = 0, 0
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    @property
    def num_examples(self) -> int:
        """Number of examples in one epoch."""
        return len(self._ids)

    def state(self) -> dict[str, int]:
        """The position in the stream, as a small JSON-able dict."""
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: Mapping[str, int]) -> None:
        """Moves to `state` (from `state()`): the next batches are the ones that followed it."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_examples:
            raise ConfigError(
                f"Batcher state {dict(state)} does not fit a dataset of {self.num_examples} "
                "examples; restore with the dataset (and seq_len) the state was saved with."
            )
        self._epoch, self._position = epoch, position

    @classmethod
    def from_state(
        cls, examples: Sequence[Mapping], state: Mapping[str, int], **kwargs: Any
    ) -> Batcher:
        """A new Batcher over `examples` (same kwargs as the constructor) resumed at `state`."""
        batcher = cls(examples, **kwargs)
        batcher.restore(state)
        return batcher

    def _peek(self) -> int:
        if self._perm_epoch != self._epoch:
            rng = np.random.default_rng(self.seed + self._epoch)
            self._perm, self._perm_epoch = rng.permutation(self.num_examples), self._epoch
        return int(self._perm[self._position])

    def _take(self) -> int:
        index = self._peek()
        self._position += 1
        if self._position == self.num_examples:
            self._epoch, self._position = self._epoch + 1, 0
        return index

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = empty_batch(self.batch_size, self.seq_len, self.pad_id, packed=self.pack)
        for row in range(self.batch_size):
            start, segment = 0, 1
            while True:
                i = self._take()
                n = _put(batch, row, start, self._ids[i], self._mask[i])
                if not self.pack:
                    break
                batch["segment_ids"][row, start : start + n] = segment
                batch["positions"][row, start : start + n] = np.arange(n)
                # An example's first token is predicted from the previous example's last one: never a target
                # (a `text` record marks its position 0; nothing inside the example predicts it).
                batch["loss_mask"][row, start] = 0
                start, segment = start + n, segment + 1
                # Whole examples only: the row ends when the next one does not fit.
                if start + len(self._ids[self._peek()]) > self.seq_len:
                    break
        return batch


def empty_batch(rows: int, seq_len: int, pad_id: int, *, packed: bool = False) -> dict[str, np.ndarray]:
    """A batch of `rows` empty rows (all padding): the arrays `Batcher` documents."""
    shape = (rows, seq_len)
    batch = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
    }
    if packed:
        batch["segment_ids"] = np.zeros(shape, np.int32)
        batch["positions"] = np.zeros(shape, np.int32)
    return batch


def _put(batch: dict[str, np.ndarray], row: int, start: int, ids: Sequence[int], mask: Sequence[int]) -> int:
    """Writes one example at `batch[row, start:]` (cut to the row's end); returns the tokens written."""
    n = min(len(ids), batch["input_ids"].shape[1] - start)
    batch["input_ids"][row, start : start + n] = ids[:n]
    batch["loss_mask"][row, start : start + n] = mask[:n]
    batch["attention_mask"][row, start : start + n] = 1
    return n


def ordered_batches(
    encoded: Sequence[Mapping[str, Any]], rows: int, seq_len: int, pad_id: int
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `encoded` in order, in fixed-shape batches (the last one padded with empty rows)."""
    for start in range(0, len(encoded), rows):
        batch = empty_batch(rows, seq_len, pad_id)
        for i, example in enumerate(encoded[start : start + rows]):
            _put(batch, i, 0, example["input_ids"], example["loss_mask"])
        yield batch
