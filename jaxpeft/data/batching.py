"""Batching of encoded examples into numpy arrays: the resumable training stream (`Batcher`, each batch
padded to a length bucket) and one ordered pass for evaluation (`ordered_batches`, one fixed shape). Both
fill a row the same way.

Loss-mask convention: see jaxpeft/data/encode.py (loss_mask[b, t] == 1: token t is a target).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxpeft.core.errors import ConfigError, DataError


# The stream's layout version, kept in `Batcher.state()`: 2 = epochs end cleanly and packed rows are filled
# first-fit. A state without it comes from the earlier stream (batches straddled epochs, rows were filled one
# after the other), whose batches this one cannot continue exactly.
STREAM_VERSION = 2


def length_buckets(seq_len: int, *, floor: int = 16) -> tuple[int, ...]:
    """The row lengths a batch is padded to: 16, 24, 32, 48, 64, 96, 128, 192, ... (2^k and 1.5 x 2^k)
    below `seq_len`, then `seq_len`. A batch pays at most 1.5x its longest row, and a stream of rows up to
    `seq_len` has about 2 log2(seq_len / 16) + 1 shapes (512: 11), each compiled once."""
    out, k = [], floor
    while k < seq_len:
        out.append(k)
        if k * 3 // 2 < seq_len:
            out.append(k * 3 // 2)
        k *= 2
    return tuple(out) + (seq_len,)


class Batcher:
    """Deterministic, resumable iterator of numpy batches of encoded examples, `batch_size` rows each.

    Epoch e visits all examples in the order of a permutation seeded with `seed + e`. A batch takes the
    stream's next examples in that order, each into the first of its rows where it fits whole (without
    `pack`: the first empty row, one example a row); it ends when the next example fits in no row, or when
    the epoch ends, so the epoch's last batch may hold fewer examples (its other rows are empty padding:
    no targets). Batches never straddle two epochs, so an epoch is `epoch_widths()`'s batches (without
    `pack`: ceil(examples / batch_size)) and N epochs see every example exactly N times.

    The state is `{"epoch": e, "position": p, "stream": STREAM_VERSION}` (the next example is
    permutation_e[p]); a Batcher restored to a state yields exactly the batches that followed it.

    Each batch is a dict of numpy arrays, `(batch_size, width)`: width is the batch's longest row rounded
    up to the first of `buckets` that holds it (None: every batch is `seq_len` wide); the batch that ends
    an epoch is as wide as that epoch's widest, so its few rows compile no new shape:
      input_ids_BxS int32 (right-padded with pad_id), loss_mask_BxS int32 (module docstring:
      1 where input_ids[b, t] is a target predicted from t - 1), attention_mask_BxS int32
      (1 = real token). With `pack=True` each row holds several whole examples (at most `seq_len` tokens),
      and the batch also has segment_ids_BxS int32 (1, 2, 3... per example in the row, 0 = padding) and
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
        buckets: Sequence[int] | None = None,
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
        buckets = tuple(int(b) for b in (buckets or (seq_len,)))
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] != seq_len:
            raise ConfigError(f"buckets {buckets}: expected increasing lengths ending at seq_len={seq_len}, "
                              f"e.g. length_buckets({seq_len}) = {length_buckets(seq_len)}.")
        self._ids = [np.asarray(e["input_ids"], np.int32) for e in examples]
        self._mask = [np.asarray(e["loss_mask"], np.int32) for e in examples]
        self._lengths = [len(x) for x in self._ids]
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.seed, self.pack, self.buckets = seed, pack, buckets
        self._epoch, self._position = 0, 0
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)
        self._widest_of: dict[int, int] = {}

    @property
    def num_examples(self) -> int:
        """Number of examples in one epoch."""
        return len(self._ids)

    def state(self) -> dict[str, int]:
        """The position in the stream, as a small JSON-able dict."""
        return {"epoch": self._epoch, "position": self._position, "stream": STREAM_VERSION}

    def restore(self, state: Mapping[str, int]) -> None:
        """Moves to `state` (from `state()`): the next batches are the ones that followed it."""
        if state.get("stream") != STREAM_VERSION:
            raise ConfigError(
                f"Batcher state {dict(state)} was saved by an earlier jaxpeft, whose data stream let a batch "
                "straddle two epochs and packed rows one after the other; this one ends each epoch cleanly and "
                "packs rows first-fit, so it cannot continue that run's batches exactly. Start a new --out "
                "(or finish the run with the jaxpeft that started it)."
            )
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

    def epoch_widths(self, epochs: int = 1) -> list[int]:
        """The width of every batch of the first `epochs` epochs, in order, without building them (so
        `len(...)` is the steps of that many epochs); the stream's own position is left as it was."""
        widths = []
        with self._dry_pass(0):
            while self._epoch < epochs:
                widths.append(self._next_rows()[1])
        return widths

    @contextlib.contextmanager
    def _dry_pass(self, epoch: int):
        """Moves to the start of `epoch` for a pass that plans batches without building them, then back."""
        saved = self._epoch, self._position
        self._epoch, self._position = epoch, 0
        try:
            yield
        finally:
            self._epoch, self._position = saved

    def _next_rows(self) -> tuple[list[list[int]], int]:
        """The next batch's rows (example indices) and width. The batch that ends an epoch is as wide as
        the epoch's widest, so a last batch of a few short rows reuses a compiled shape."""
        epoch = self._epoch
        rows = self._plan()
        width = self._width(rows)
        if self._epoch != epoch:
            width = max(width, self._widest(epoch))
        return rows, width

    def _widest(self, epoch: int) -> int:
        """The widest bucket epoch `epoch`'s batches need (a dry pass over it, remembered)."""
        if epoch not in self._widest_of:
            widest = 0
            with self._dry_pass(epoch):
                while self._epoch == epoch:
                    widest = max(widest, self._width(self._plan()))
            self._widest_of = {epoch: widest}  # one epoch at a time is all a stream asks for
        return self._widest_of[epoch]

    def _width(self, rows: list[list[int]]) -> int:
        longest = max(sum(self._lengths[i] for i in row) for row in rows)
        return next(b for b in self.buckets if b >= longest)

    def _peek(self) -> int:
        if self._perm_epoch != self._epoch:
            rng = np.random.default_rng(self.seed + self._epoch)
            self._perm, self._perm_epoch = rng.permutation(self.num_examples), self._epoch
        return int(self._perm[self._position])

    def _plan(self) -> list[list[int]]:
        """The next batch's rows (example indices), taken from the stream (module docstring: first fit)."""
        rows: list[list[int]] = [[] for _ in range(self.batch_size)]
        used = [0] * self.batch_size
        while True:
            i = self._peek()
            n = self._lengths[i]
            row = next((r for r in range(self.batch_size)
                        if (used[r] + n <= self.seq_len if self.pack else not rows[r])), None)
            if row is None:
                return rows
            rows[row].append(i)
            used[row] += n
            self._position += 1
            if self._position == self.num_examples:  # the epoch ends with this batch
                self._epoch, self._position = self._epoch + 1, 0
                return rows

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, width = self._next_rows()
        batch = empty_batch(self.batch_size, width, self.pad_id, packed=self.pack)
        for r, row in enumerate(rows):
            start = 0
            for segment, i in enumerate(row, start=1):
                n = _put(batch, r, start, self._ids[i], self._mask[i])
                if self.pack:
                    batch["segment_ids"][r, start : start + n] = segment
                    batch["positions"][r, start : start + n] = np.arange(n)
                    # An example's first token is predicted from the previous example's last one: never a
                    # target (a `text` record marks its position 0; nothing inside the example predicts it).
                    batch["loss_mask"][r, start] = 0
                start += n
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
