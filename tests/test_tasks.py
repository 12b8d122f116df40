"""Tests for the bundled tasks and the generic scorers."""

from __future__ import annotations

import datetime
import re

import pytest

from jaxpeft.core.errors import ConfigError
from jaxpeft.data import tasks


@pytest.fixture(scope="module")
def dates() -> tasks.TaskSpec:
    return tasks.get_task("dates")


def test_get_task_unknown_lists_known_names():
    with pytest.raises(ConfigError) as e:
        tasks.get_task("datez")
    assert "datez" in str(e.value) and "dates" in str(e.value)


def test_records_are_alpaca_and_deterministic(dates):
    a = dates.make_split("train", 37, 3)
    assert a == dates.make_split("train", 37, 3)
    assert a != dates.make_split("train", 37, 4)
    assert all(set(r) == {"instruction", "input", "output"} for r in a)
    # A smaller request is a prefix of a larger one.
    assert dates.make_split("eval", 11, 0) == dates.make_split("eval", 50, 0)[:11]


def test_default_sizes_and_train_eval_disjoint(dates):
    train = dates.make_split("train", dates.n_train, 0)
    evals = dates.make_split("eval", dates.n_eval, 0)
    assert (len(train), len(evals)) == (2000, 200)
    # Disjoint by underlying date (hence by input), even across seeds.
    other_seed = dates.make_split("train", dates.n_train, 1)
    train_dates = {r["output"] for r in train + other_seed}
    assert not train_dates & {r["output"] for r in evals}
    assert not {r["input"] for r in train} & {r["input"] for r in evals}
    pools = {tasks.date_split_of(datetime.date.fromisoformat(r["output"])) for r in evals}
    assert pools == {"eval"}


def test_answers_vary_and_match_their_inputs(dates):
    records = dates.make_split("train", 300, 0)
    assert len({r["output"] for r in records}) == 300
    assert len({r["instruction"] for r in records}) == 1
    for r in records:
        d = datetime.date.fromisoformat(r["output"])
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["output"])
        assert str(d.year) in r["input"]
    # Every input style shows up.
    endings = {tasks.render_date(datetime.date(2021, 3, 5), s) for s in range(13)}
    assert len(endings) == 13


@pytest.mark.parametrize(
    ("style", "text"),
    [
        (0, "Friday, 5 March 2021"),
        (3, "05/03/2021 (day/month/year)"),
        (4, "03/05/2021 (month/day/year)"),
        (5, "the 5th of March, 2021"),
        (6, "2021, March 5th"),
    ],
)
def test_render_date_styles(style, text):
    assert tasks.render_date(datetime.date(2021, 3, 5), style) == text


def test_bad_split_or_size(dates):
    with pytest.raises(ConfigError, match="'train' and 'eval'"):
        dates.make_split("test", 5, 0)
    with pytest.raises(ConfigError, match="at most"):
        dates.make_split("eval", 10**6, 0)


def test_metrics():
    assert tasks.exact_match(" 2021-03-05\n", "2021-03-05") == 1.0
    assert tasks.exact_match("2021-03-5", "2021-03-05") == 0.0
    assert tasks.normalized_match("Hello, World!", "hello world") == 1.0
    assert tasks.normalized_match("hello", "help") == 0.0
    assert tasks.char_similarity("abcd", "abcd") == 1.0
    assert tasks.char_similarity("", "") == 1.0
    assert tasks.char_similarity("", "x") == 0.0
    assert 0.7 < tasks.char_similarity("2021-03-06", "2021-03-05") < 1.0


def test_dates_score(dates):
    s = dates.score("2021-03-05", "2021-03-05")
    assert s["exact_match"] == s["normalized_match"] == s["char_similarity"] == 1.0
    s = dates.score("2021-03-05\nThat is a Friday.", "2021-03-05")
    assert s["exact_match"] == 0.0 and s["first_line_match"] == 1.0
    s = dates.score("March 5, 2021", "2021-03-05")
    assert s["exact_match"] == 0.0 and s["normalized_match"] == 0.0 and s["char_similarity"] < 0.6
