"""The training stream's packing, length buckets and epochs (jaxpeft/data/batching.py), the run's row
length and step count (jaxpeft/train/run_data.py) and the --epochs / --steps flags. Numpy-level, except one
tiny-model check that a packed batch's loss is each example's own and that empty rows add nothing."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiments import common
from jaxpeft.core.errors import ConfigError
from jaxpeft.data.batching import STREAM_VERSION, Batcher, length_buckets
from jaxpeft.models.config import LlamaConfig
from jaxpeft.models.families import build_model
from jaxpeft.train.loop import micro_batch_targets
from jaxpeft.train.run_config import RunConfig
from jaxpeft.train.run_data import row_length, run_steps
from jaxpeft.train.step import token_nll_sum


def _examples(lengths) -> list[dict]:
    # Example i: tokens (i+1)*1000 + t; the first is a prompt token, the rest targets.
    return [{"input_ids": [(i + 1) * 1000 + t for t in range(n)], "loss_mask": [0] + [1] * (n - 1)}
            for i, n in enumerate(lengths)]


def _rows(batch) -> list[list[tuple[int, int]]]:
    """Per row, the (example, length) of each segment, read back from the arrays alone."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        ids, seg = batch["input_ids"][r], batch["segment_ids"][r]
        out.append([(int(ids[seg == s][0]) // 1000 - 1, int((seg == s).sum())) for s in range(1, seg.max() + 1)])
    return out


LENGTHS = [int(n) for n in np.random.default_rng(3).integers(3, 40, 37)]  # 37 examples of 3-39 tokens


def test_length_buckets():
    assert length_buckets(128) == (16, 24, 32, 48, 64, 96, 128)
    assert length_buckets(512) == (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    assert length_buckets(112) == (16, 24, 32, 48, 64, 96, 112) and length_buckets(11) == (11,)
    with pytest.raises(ConfigError, match="ending at seq_len=40"):
        Batcher(_examples([3]), batch_size=1, seq_len=40, pad_id=0, buckets=(16, 32))


def test_packed_rows_hold_whole_examples_once_per_epoch_with_restarting_positions():
    b = Batcher(_examples(LENGTHS), batch_size=3, seq_len=48, pad_id=-1, seed=2, pack=True,
                buckets=length_buckets(48))
    seen, order, widths = [], np.random.default_rng(2).permutation(len(LENGTHS)).tolist(), []
    while b.state()["epoch"] == 0:
        batch = next(b)
        width = batch["input_ids"].shape[1]
        for r, row in enumerate(_rows(batch)):
            seg, pos = batch["segment_ids"][r], batch["positions"][r]
            start = 0
            for s, (i, n) in enumerate(row, start=1):
                assert n == LENGTHS[i]  # never split
                np.testing.assert_array_equal(np.flatnonzero(seg == s), np.arange(start, start + n))
                np.testing.assert_array_equal(pos[start:start + n], np.arange(n))
                np.testing.assert_array_equal(batch["input_ids"][r, start:start + n], (i + 1) * 1000 + np.arange(n))
                assert batch["loss_mask"][r, start] == 0 and batch["loss_mask"][r, start + 1:start + n].all()
                start += n
            assert start <= 48 and (batch["input_ids"][r, start:] == -1).all()
            assert not batch["attention_mask"][r, start:].any() and not batch["loss_mask"][r, start:].any()
            assert (pos[start:] == 0).all() and (seg[start:] == 0).all()
        longest = max(sum(n for _, n in row) for row in _rows(batch))
        bucket = min(w for w in length_buckets(48) if w >= longest)
        widths.append(width)
        # The epoch's last batch is as wide as its widest (no new shape for a few short rows).
        assert width == (max(widths[:-1] + [bucket]) if b.state()["epoch"] == 1 else bucket)
        taken = [i for row in _rows(batch) for i, _ in row]
        assert sorted(taken) == sorted(order[len(seen):len(seen) + len(taken)])  # the stream's next examples
        # First fit: the batch ended because the next example fits in no row (or the epoch ended).
        used = [sum(n for _, n in row) for row in _rows(batch)]
        if b.state()["epoch"] == 0:
            assert min(used) + LENGTHS[order[len(seen) + len(taken)]] > 48
        seen += taken
    assert sorted(seen) == list(range(len(LENGTHS)))  # each example exactly once: the epoch ended cleanly
    assert widths == b.epoch_widths(1)
    assert b.state() == {"epoch": 1, "position": 0, "stream": STREAM_VERSION}


def test_epoch_widths_count_the_batches_of_n_epochs_and_leave_the_stream_alone():
    kwargs = dict(batch_size=4, seq_len=48, pad_id=0, seed=5, buckets=length_buckets(48))
    for pack in (False, True):
        b = Batcher(_examples(LENGTHS), pack=pack, **kwargs)
        next(b)
        state = b.state()
        widths = b.epoch_widths(3)
        assert b.state() == state
        fresh, got = Batcher(_examples(LENGTHS), pack=pack, **kwargs), []
        while fresh.state()["epoch"] < 3:
            got.append(next(fresh)["input_ids"].shape[1])
        assert widths == got and set(widths) <= set(length_buckets(48))
        if not pack:
            assert len(b.epoch_widths(1)) == -(-len(LENGTHS) // 4) and len(widths) == 3 * 10
        else:
            assert len(widths) < 3 * 10  # packing: fewer rows than examples


def test_the_last_batch_of_an_epoch_is_padded_to_a_shape_the_epoch_already_has():
    lengths = [20, 30, 17, 40, 3]
    b = Batcher(_examples(lengths), batch_size=2, seq_len=48, pad_id=0, buckets=length_buckets(48))
    order = np.random.default_rng(0).permutation(5).tolist()
    shapes = [next(b)["input_ids"].shape for _ in range(3)]
    assert b.state() == {"epoch": 1, "position": 0, "stream": STREAM_VERSION}
    assert shapes[:2] == [(2, min(w for w in length_buckets(48) if w >= max(lengths[i] for i in pair)))
                          for pair in (order[:2], order[2:4])]
    assert shapes[2] == (2, max(s[1] for s in shapes))  # one example of lengths[order[4]] tokens, one empty row
    b.restore({"epoch": 0, "position": 4, "stream": STREAM_VERSION})
    last = next(b)
    assert last["attention_mask"].sum(1).tolist() == [lengths[order[4]], 0] and last["loss_mask"][1].sum() == 0


@pytest.mark.parametrize("pack", [False, True])
def test_resume_is_exact_with_packing_and_buckets(pack):
    kwargs = dict(batch_size=3, seq_len=48, pad_id=0, seed=9, pack=pack, buckets=length_buckets(48))
    reference = Batcher(_examples(LENGTHS), **kwargs)
    batches = [next(reference) for _ in range(30)]  # several epochs, several widths
    assert len({x["input_ids"].shape for x in batches}) > 1
    for cut in (1, 7, 13, 22):
        fresh = Batcher(_examples(LENGTHS), **kwargs)
        for _ in range(cut):
            next(fresh)
        resumed = Batcher.from_state(_examples(LENGTHS), json.loads(json.dumps(fresh.state())), **kwargs)
        for expected in batches[cut:]:
            got = next(resumed)
            assert got.keys() == expected.keys()
            for k in got:
                np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def _old_unpacked_batches(examples, batch_size, seq_len, pad_id, seed, count):
    """The stream before packing by default (a copy of its logic): one example a row, every batch seq_len
    wide, batches straddling epochs."""
    order = [i for e in range(count * batch_size // len(examples) + 1)
             for i in np.random.default_rng(seed + e).permutation(len(examples))]
    for k in range(count):
        batch = np.full((batch_size, seq_len), pad_id, np.int32)
        for r, i in enumerate(order[k * batch_size:(k + 1) * batch_size]):
            batch[r, :len(examples[i]["input_ids"])] = examples[i]["input_ids"]
        yield batch


def test_nopack_gives_the_old_batches_cut_to_their_bucket():
    examples = _examples(LENGTHS)
    b = Batcher(examples, batch_size=4, seq_len=48, pad_id=-1, seed=1, buckets=length_buckets(48))
    count = len(LENGTHS) // 4  # the first epoch's full batches (the old stream straddled after them)
    for old in _old_unpacked_batches(examples, 4, 48, -1, 1, count):
        new = next(b)
        width = new["input_ids"].shape[1]
        np.testing.assert_array_equal(new["input_ids"], old[:, :width])
        assert (old[:, width:] == -1).all() and "segment_ids" not in new
    fixed = Batcher(examples, batch_size=4, seq_len=48, pad_id=-1, seed=1)  # buckets=None: one shape
    assert {next(fixed)["input_ids"].shape for _ in range(12)} == {(4, 48)}


def test_row_length_and_a_dates_like_stream_has_one_shape():
    # Examples of 71-81 tokens at seq_len 128 (the builtin dates): no two fit in a row, so packing pads to the
    # longest example rounded to 16, as the unpacked stream does, and every batch is 96 wide.
    lengths = [int(n) for n in np.random.default_rng(0).integers(71, 82, 300)]
    assert row_length(128, lengths, True) == row_length(128, lengths, False) == 96
    assert row_length(128, lengths, False, longest=100) == 112  # the held-out examples fit too
    assert row_length(128, [30, 90, 100], True) == 128 and row_length(64, [30, 40], True) == 48
    b = Batcher(_examples(lengths), batch_size=8, seq_len=96, pad_id=0, pack=True, buckets=length_buckets(96))
    assert set(b.epoch_widths(2)) == {96}


@pytest.mark.parametrize("pack", [False, True])
def test_max_targets_bounds_every_bucket(pack):
    b = Batcher(_examples(LENGTHS), batch_size=4, seq_len=48, pad_id=0, seed=4, pack=pack,
                buckets=length_buckets(48))
    bound = micro_batch_targets(_examples(LENGTHS), 4, 48, pack)
    for _ in range(40):
        batch = next(b)
        assert batch["loss_mask"][:, 1:].sum() <= bound


def test_run_steps_from_epochs():
    b = Batcher(_examples(LENGTHS), batch_size=4, seq_len=48, pad_id=0, pack=True, buckets=length_buckets(48))
    assert run_steps(RunConfig(out="x", steps=7), b) == 7
    assert run_steps(RunConfig(out="x", steps=7, epochs=2), b) == len(b.epoch_widths(2))
    with pytest.raises(ConfigError, match="--epochs=0"):
        run_steps(RunConfig(out="x", epochs=0), b)


def _parse(argv):
    fv = flags.FlagValues()
    common.define_run_flags(fv, default_steps=100)
    fv(["prog", *argv])
    return common.run_config_from_flags(fv, "lora")


def test_flags_pack_by_default_and_explicit_steps_win_over_epochs():
    cfg = _parse([])
    assert cfg.pack and cfg.epochs is None and cfg.steps == 100
    assert not _parse(["--nopack"]).pack
    assert _parse(["--epochs=3"]).epochs == 3
    both = _parse(["--epochs=3", "--steps=5"])
    assert both.epochs is None and both.steps == 5


def test_a_packed_batch_gives_each_example_its_own_loss_and_empty_rows_add_nothing():
    config = LlamaConfig(vocab_size=61, hidden_size=40, intermediate_size=52, num_hidden_layers=1,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    model = build_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(1)
    lengths = [9, 5, 12, 7, 6]
    examples = [{"input_ids": rng.integers(3, 61, n).tolist(), "loss_mask": [0, 0] + [1] * (n - 2)}
                for n in lengths]
    # One epoch of 5 examples in 3 rows of 24 tokens: packed rows, and an empty third row.
    batch = next(Batcher(examples, batch_size=3, seq_len=24, pad_id=0, pack=True, buckets=length_buckets(24)))
    assert batch["attention_mask"][2].sum() == 0 and batch["segment_ids"].max() > 1
    loss = jax.jit(jax.value_and_grad(lambda p, x: token_nll_sum(model, p, x, max_targets=64), has_aux=True))
    (got, n), grads = loss(params, {k: jnp.asarray(v) for k, v in batch.items()})
    # The same examples unpacked, one a row (right padding: causal attention makes it invisible).
    alone = next(Batcher(examples, batch_size=5, seq_len=12, pad_id=0))
    (want, _), _ = loss(params, {k: jnp.asarray(v) for k, v in alone.items()})
    assert int(n) == sum(n - 2 for n in lengths) and np.isfinite(float(got))
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
