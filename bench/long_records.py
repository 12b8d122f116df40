"""Long SFT records for the 8k CLI run: real instruction text, prompt and answer each thousands of tokens.

    python -m bench.long_records --out=/tmp/long8k.jsonl            # 8 records of 8,000-8,192 tokens
    python -m experiments.lora --dataset=/tmp/long8k.jsonl --seq_len=8192 --batch_size=1 --remat --steps=3 \\
        --eval_examples=0 --nopack

Each record is Alpaca-shaped (instruction, input, output). The instruction asks for the answers to a numbered
list of code_alpaca tasks; the input holds those tasks; the output holds their reference answers in order,
so the answer is real text and the longer half of the row. Records draw disjoint tasks. Lengths are counted
with the tokenizer and encoding the training run uses (`jaxpeft.data.encode.encode_records`, the default
model's chat template), and every record is checked: total tokens in [--min_tokens, --seq_len], answer
(target) tokens at least --min_answer. Written to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

DATA = os.path.join(_REPO, "..", "shared", "data", "code_alpaca_2k.json")


def _record(tasks: list[dict]) -> dict:
    listing = "\n\n".join(f"Task {i + 1}: {t['instruction']}" + (f"\n{t['input']}" if t["input"] else "")
                          for i, t in enumerate(tasks))
    answers = "\n\n".join(f"Answer {i + 1}:\n{t['output']}" for i, t in enumerate(tasks))
    return {"instruction": "Answer every numbered task below, in order, each under its own heading.",
            "input": listing, "output": answers}


def build(tokenizer, tasks: list[dict], *, n: int, seq_len: int, min_tokens: int, min_answer: int) -> list[dict]:
    """`n` records of min_tokens..seq_len tokens with >= min_answer target tokens, from disjoint `tasks`."""
    from jaxpeft.data.encode import encode_records

    def size(rec: dict) -> tuple[int, int]:
        ex, _ = encode_records(tokenizer, [rec], seq_len=10**7)
        return len(ex[0]["input_ids"]), sum(ex[0]["loss_mask"])

    out, pos = [], 0
    for _ in range(n):
        chosen: list[dict] = []
        total = answer = 0
        while total < min_tokens:
            if pos >= len(tasks):
                raise SystemExit(f"ran out of tasks after {len(out)} records: lower --records or --min_tokens")
            t, a = size(_record(chosen + [tasks[pos]]))
            if t <= seq_len:  # a task that would overflow the row is skipped
                chosen, total, answer = chosen + [tasks[pos]], t, a
            pos += 1
        if answer < min_answer:
            raise SystemExit(f"record {len(out)}: {answer} answer tokens of {total}; wanted >= {min_answer}")
        out.append({**_record(chosen), "_tokens": total, "_answer_tokens": answer})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--records", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--min_tokens", type=int, default=8000)
    p.add_argument("--min_answer", type=int, default=4096)
    args = p.parse_args(argv)
    from jaxpeft.convert.default_model import cached_hf_folder
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cached_hf_folder())
    with open(DATA) as fh:
        tasks = json.load(fh)
    # long answers first, so a record's answer outweighs its prompt
    tasks = sorted(tasks, key=lambda t: len(t["output"]) - len(t["instruction"]) - len(t["input"]), reverse=True)
    recs = build(tokenizer, tasks, n=args.records, seq_len=args.seq_len, min_tokens=args.min_tokens,
                 min_answer=args.min_answer)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        for r in recs:
            fh.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
    os.replace(tmp, args.out)
    for i, r in enumerate(recs):
        print(f"record {i}: {r['_tokens']} tokens, answer {r['_answer_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
