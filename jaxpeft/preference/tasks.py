"""`builtin:dates-pref`: the bundled date-normalisation task (jaxpeft/data/tasks.py) as preference pairs.

Each record is conversational in TRL's format: the prompt is the user's request (the dates task's
instruction and input), chosen is the right ISO date and nothing else, rejected one of the three ways
SmolLM2-135M-Instruct itself fails the request before training (seen in its greedy answers), in equal shares:

- `wrong date`: an ISO date near the right one: half of them with the year replaced by a recent one
  (2019-2024: "4 may 1962" -> "2022-05-04", the base's most common ISO answer), the others with day and
  month swapped, the day or month off by one, or the year off by one or by a decade;
- `not rewritten`: the input echoed back, capitalised or in a neighbouring human style ("the 4th of June,
  1956" -> "The 4th of June, 1956"; "Oct 15th, 2031" -> "Oct 15, 2031");
- `chatter`: the right date with a sentence before or after it ("2031-10-15\n\nThis date is in ISO 8601
  format."), which the exact-match score rejects as it rejects the others.

The held-out pool is the dates task's (a fixed hash of the calendar date), so train and eval
dates are disjoint for every seed; the same (split, n, seed) always gives the same records.
"""

from __future__ import annotations

import datetime
import random
from typing import Any

from jaxpeft.core.errors import ConfigError
from jaxpeft.data import tasks as sft_tasks

N_TRAIN, N_EVAL = 2000, 200


def _wrong(d: datetime.date, rng: random.Random) -> str:
    """A wrong ISO date close to `d`, chosen by `rng` among the kinds that apply."""
    if rng.random() < 0.5:
        year = rng.choice([y for y in range(2019, 2025) if y != d.year])
        return f"{year:04d}-{d.month:02d}-{d.day:02d}"
    options = []
    if d.day <= 12 and d.day != d.month:
        options.append(f"{d.year:04d}-{d.day:02d}-{d.month:02d}")  # day/month swapped
    for delta in (1, -1):
        options.append((d + datetime.timedelta(days=delta)).isoformat())
        options.append(f"{d.year + delta:04d}-{d.month:02d}-{d.day:02d}")
    if 1 < d.month < 12:
        options.append(f"{d.year:04d}-{d.month + rng.choice((1, -1)):02d}-{min(d.day, 28):02d}")
    options.append(f"{d.year + rng.choice((10, -10)):04d}-{d.month:02d}-{d.day:02d}")
    options = [o for o in dict.fromkeys(options) if o != d.isoformat()]
    return rng.choice(options)


_CHATTER = (
    "{iso}\n\nThis date is in ISO 8601 format.",
    "The date in ISO 8601 format is {iso}.",
    "{iso}\n\nISO 8601 writes the year first, then the month, then the day.",
    "Sure! Here is the date in ISO 8601 format: {iso}",
)
REJECTED_KINDS = ("wrong date", "not rewritten", "chatter")


def _not_rewritten(d: datetime.date, source: str, rng: random.Random) -> str:
    """The prompt's `source` given back (the request ignored): as written but capitalised, or `d` in another
    human style."""
    if rng.random() < 0.5:
        return source[:1].upper() + source[1:]
    styles = [s for s in range(sft_tasks.num_date_styles()) if sft_tasks.render_date(d, s) != source]
    return sft_tasks.render_date(d, rng.choice(styles))


def rejected_answer(d: datetime.date, source: str, kind: str, rng: random.Random) -> str:
    """A rejected answer of `kind` (one of REJECTED_KINDS) for the date `d` given as `source`."""
    if kind == "wrong date":
        return _wrong(d, rng)
    if kind == "not rewritten":
        return _not_rewritten(d, source, rng)
    if kind == "chatter":
        return rng.choice(_CHATTER).format(iso=d.isoformat())
    raise ValueError(f"unknown rejected kind {kind!r}; expected one of {REJECTED_KINDS}")


def make_dates_pref_split(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` preference records of `split` ("train" or "eval")."""
    base = sft_tasks.get_task("dates").make_split(split, n, seed)
    rng = random.Random(f"dates-pref:{split}:{seed}")
    out = []
    for r in base:
        d = datetime.date.fromisoformat(r["output"])
        prompt = [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}]
        kind = REJECTED_KINDS[rng.randrange(len(REJECTED_KINDS))]
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": r["output"]}],
                    "rejected": [{"role": "assistant", "content": rejected_answer(d, r["input"], kind, rng)}]})
    return out


PREFERENCE_TASKS = {"dates-pref": (make_dates_pref_split, N_TRAIN, N_EVAL)}


def load_preference_task(name: str, *, seed: int, n_train: int | None = None, n_eval: int | None = None
                         ) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of the bundled preference task `name`."""
    if name not in PREFERENCE_TASKS:
        raise ConfigError(f"unknown preference task builtin:{name}; known: "
                          f"{', '.join('builtin:' + k for k in PREFERENCE_TASKS)}")
    make, nt, ne = PREFERENCE_TASKS[name]
    return make("train", n_train or nt, seed), make("eval", n_eval or ne, seed)
