"""`builtin:dates-pref`: the bundled date-normalisation task (jaxpeft/data/tasks.py) as preference pairs.

Each record is conversational in TRL's format: the prompt is the user's request (the dates task's
instruction and input), chosen is the right ISO date, rejected a plausible wrong one: day and month swapped,
the day or month off by one, the year off by one or by a decade, or the digits of the input date copied in
its own order. The held-out pool is the dates task's (a fixed hash of the calendar date), so train and eval
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


def make_dates_pref_split(split: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` preference records of `split` ("train" or "eval")."""
    base = sft_tasks.get_task("dates").make_split(split, n, seed)
    rng = random.Random(f"dates-pref:{split}:{seed}")
    out = []
    for r in base:
        d = datetime.date.fromisoformat(r["output"])
        prompt = [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}]
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": r["output"]}],
                    "rejected": [{"role": "assistant", "content": _wrong(d, rng)}]})
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
