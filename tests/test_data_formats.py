"""Training data as TRL users bring it (issue 19): every TRL 1.16 SFT format tokenizes to the same tokens and
targets as TRL's own SFTTrainer, built in the same run (skipped where trl is not installed); Alpaca records
tokenize exactly as before; bad input is one clear error.

TRL's side is `SFTTrainer(...).train_dataset` with its defaults (max_length above every example), on a tiny
random model (TRL only needs one to exist) and the default model's tokenizer: its `input_ids`, and
`labels != -100` as the targets. Ours is what `experiments.data --dump` writes: `preview.encode_dataset` on a
JSONL file of the same records.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from jaxpeft import data
from jaxpeft.core.errors import ConfigError, DataError
from jaxpeft.data import preview, targets

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SYSTEM = {"role": "system", "content": "You answer in one line."}
TEXT = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "Already closed.<|im_end|>", "id": 3},
        {"text": "Two lines:\nthe second one."}]
PROMPT_COMPLETION = [{"prompt": "Q: What is 2+2?\nA:", "completion": " 4"},
                     {"prompt": "Translate to French: cat", "completion": " chat", "source": "x"}]
CONVERSATIONAL = [
    {"prompt": [{"role": "user", "content": "Hi there"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
    {"prompt": [SYSTEM, {"role": "user", "content": "Capital of France?"}],
     "completion": [{"role": "assistant", "content": "Paris."}]},
]
MULTI_TURN = [
    {"messages": [{"role": "user", "content": "Count to two."}, {"role": "assistant", "content": "1, 2"},
                  {"role": "user", "content": "And three?"}, {"role": "assistant", "content": "1, 2, 3"}]},
    {"messages": [SYSTEM, {"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "At night?"}, {"role": "assistant", "content": "Black."}]},
]
SHAREGPT = [{"conversations": [{"from": "user", "value": "Name a fruit."}, {"from": "assistant", "value": "Apple."},
                               {"from": "user", "value": "Another."}, {"from": "assistant", "value": "Pear."}]}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALLS = [{
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    ],
    "tools": json.dumps([WEATHER_TOOL]),  # a JSON string, as hub datasets store it; TRL json.loads it
}]


def _trl_path() -> Path:
    trl = pytest.importorskip("trl")
    return Path(trl.__file__).parent / "chat_templates"


QWEN_TRAINING = "qwen2_5_training.jinja"


@pytest.fixture(scope="module")
def trl_sft(smollm2_tokenizer, tmp_path_factory):
    """`(records, **SFTConfig kwargs) -> [(input_ids, targets)]`: TRL's tokenized train dataset."""
    pytest.importorskip("trl")
    pytest.importorskip("torch")
    datasets = pytest.importorskip("datasets")
    import transformers
    from trl import SFTConfig, SFTTrainer

    config = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out_dir = tmp_path_factory.mktemp("trl")

    def run(records, **kwargs):
        args = SFTConfig(output_dir=str(out_dir), max_length=100_000, report_to=[], use_cpu=True,
                         dataset_num_proc=None, **kwargs)
        # TRL sets the tokenizer's template (chat_template_path) and pad token: give it its own copy.
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=copy.deepcopy(smollm2_tokenizer))
        return [(list(r["input_ids"]), [int(t != -100) for t in r["labels"]]) for r in trainer.train_dataset]

    return run


def _ours(tokenizer, records, tmp_path, **kwargs):
    """What `experiments.data --dump` writes for these records (in a JSONL file), as (input_ids, loss_mask)."""
    path = tmp_path / f"records-{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples, _ = preview.encode_dataset(copy.deepcopy(tokenizer), str(path), seq_len=100_000, **kwargs)
    dump = tmp_path / "dump.jsonl"
    preview.write_dump(str(dump), examples)
    return [(d["input_ids"], d["loss_mask"]) for d in map(json.loads, dump.read_text().splitlines())]


def _assert_same(ours, theirs, tokenizer):
    assert len(ours) == len(theirs)
    for (ids, mask), (trl_ids, trl_mask) in zip(ours, theirs):
        assert ids == trl_ids, (tokenizer.decode(ids), tokenizer.decode(trl_ids))
        assert mask == trl_mask, [tokenizer.decode([t]) for t, m, n in zip(ids, mask, trl_mask) if m != n]
        assert 0 < sum(mask)


@pytest.mark.parametrize(("records", "train_on", "trl_kwargs"), [
    (TEXT, None, {}),
    (PROMPT_COMPLETION, None, {}),
    (PROMPT_COMPLETION, "all", {"completion_only_loss": False}),
    (CONVERSATIONAL, None, {}),
    (CONVERSATIONAL, "all", {"completion_only_loss": False}),
    (MULTI_TURN, "all", {}),
    (SHAREGPT, "all", {}),
], ids=["text", "prompt_completion", "prompt_completion-all", "conversational", "conversational-all",
        "messages-all", "sharegpt-all"])
def test_every_format_matches_trl_on_the_default_template(smollm2_tokenizer, trl_sft, tmp_path, records, train_on,
                                                          trl_kwargs):
    ours = _ours(smollm2_tokenizer, records, tmp_path, train_on=train_on)
    _assert_same(ours, trl_sft(records, **trl_kwargs), smollm2_tokenizer)


def test_conversational_completion_keeps_the_newline_after_im_end(smollm2_tokenizer, tmp_path):
    (ids, mask), _ = _ours(smollm2_tokenizer, CONVERSATIONAL, tmp_path)
    target = smollm2_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert target == "Hello!<|im_end|>\n"  # TRL's target: the "\n" after <|im_end|> included
    text = _ours(smollm2_tokenizer, TEXT[:1], tmp_path)[0]
    assert text[1][0] == 1 and text[0][-1] == smollm2_tokenizer.eos_token_id  # position 0 and EOS are targets


def test_multi_turn_assistant_matches_trl_assistant_only_loss(smollm2_tokenizer, trl_sft, tmp_path):
    """--train_on=assistant with --chat_template=qwen2_5_training.jinja == TRL's assistant_only_loss=True."""
    template = str(_trl_path() / QWEN_TRAINING)
    ours = _ours(smollm2_tokenizer, MULTI_TURN + SHAREGPT, tmp_path, train_on="assistant", chat_template=template)
    theirs = trl_sft(MULTI_TURN + [{"messages": [{"role": m["from"], "content": m["value"]}
                                                 for m in SHAREGPT[0]["conversations"]]}],
                     assistant_only_loss=True, chat_template_path=template)
    _assert_same(ours, theirs, smollm2_tokenizer)
    # Every assistant turn is a target, not only the last.
    ids, mask = ours[0]
    assert smollm2_tokenizer.decode([t for t, m in zip(ids, mask) if m]).count("<|im_end|>") == 2


def _marked(template: str) -> str:
    """SmolLM2's template with {% generation %} around each assistant turn's content and end of turn."""
    plain = ("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}")
    assert plain in template
    marked = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}" + plain + "{% endif %}")
    return template.replace(plain, marked)


def test_prefix_rule_on_a_template_without_markers_matches_trl(smollm2_tokenizer, trl_sft, tmp_path):
    """SmolLM2's own template has no markers (TRL refuses assistant_only_loss there): our prefix rule on it
    equals TRL's assistant_only_loss on the same template with markers added, which renders the same text."""
    marked = tmp_path / "smollm2_marked.jinja"
    marked.write_text(_marked(smollm2_tokenizer.chat_template))
    for r in MULTI_TURN:  # the markers change nothing in the rendering
        assert smollm2_tokenizer.apply_chat_template(r["messages"], tokenize=False, chat_template=marked.read_text()) \
            == smollm2_tokenizer.apply_chat_template(r["messages"], tokenize=False)
    ours = _ours(smollm2_tokenizer, MULTI_TURN, tmp_path)  # default: assistant
    _assert_same(ours, trl_sft(MULTI_TURN, assistant_only_loss=True, chat_template_path=str(marked)),
                 smollm2_tokenizer)
    # --train_on=last == TRL's conversational prompt/completion with the final turn as the completion.
    last = _ours(smollm2_tokenizer, MULTI_TURN, tmp_path, train_on="last")
    as_pc = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in MULTI_TURN]
    _assert_same(last, trl_sft(as_pc), smollm2_tokenizer)


def test_tool_calls_match_trl(smollm2_tokenizer, trl_sft, tmp_path):
    """An assistant tool call, a tool message and a `tools` column (a JSON string), on Qwen2.5's training
    template: the same tokens as TRL, and the call itself in the targets (never dropped)."""
    template = str(_trl_path() / QWEN_TRAINING)
    for train_on, kwargs in (("all", {}), ("assistant", {"assistant_only_loss": True})):
        ours = _ours(smollm2_tokenizer, TOOL_CALLS, tmp_path, train_on=train_on, chat_template=template)
        _assert_same(ours, trl_sft(TOOL_CALLS, chat_template_path=template, **kwargs), smollm2_tokenizer)
    (ids, mask), = ours
    text = smollm2_tokenizer.decode(ids)
    assert '"name": "get_weather"' in text and "<tools>" in text and "18 C, sunny" in text
    trained = smollm2_tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained and "18 C" in trained
    assert "<tool_response>" not in trained and "Weather in Paris" not in trained


def test_per_record_chat_template_kwargs_reach_the_template(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                         "{% if m.mood is defined %} ({{ m.mood }}){% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ footer | default('') }}")
    record = {"messages": [{"role": "user", "content": "Hi", "mood": "glad"}, {"role": "assistant", "content": "Yo"}],
              "chat_template_kwargs": {"footer": "[end]"}}
    ex = data.encode_example(tok, record, seq_len=256, train_on="all")
    assert tok.decode(ex["input_ids"]).endswith("Hi (glad)<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n[end]")


def test_alpaca_tokenizes_exactly_as_before(smollm2_tokenizer):
    """tests/fixtures/alpaca_golden.json was written by tests/fixtures/make_alpaca_golden.py with the encoder
    of commit 3a78b16, before issue 19. If this fails, Alpaca records (and the main job's data) changed."""
    golden = json.loads((FIXTURES / "alpaca_golden.json").read_text())
    for case in golden["cases"]:
        examples, stats = data.encode_records(smollm2_tokenizer, golden["records"], seq_len=case["seq_len"],
                                              chat_template=case["chat_template"])
        got = [{k: e[k] for k in ("input_ids", "loss_mask", "truncated")} for e in examples]
        assert got == case["examples"], (case["chat_template"], case["seq_len"])
        assert stats.num_truncated == case["num_truncated"]


def test_extra_keys_are_listed_once_and_formats_counted(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEXT + PROMPT_COMPLETION + SHAREGPT))
    with caplog.at_level("INFO"):
        train, _ = data.load_records(str(path))
    assert [r["_format"] for r in train] == ["text"] * 3 + ["prompt_completion"] * 2 + ["messages"]
    assert train[-1]["messages"][0] == {"role": "user", "content": "Name a fruit."}
    lines = [r.getMessage() for r in caplog.records if "ignored field" in r.getMessage()]
    assert len(lines) == 1 and "['id', 'source']" in lines[0]


def test_train_on_values_are_checked_per_format(smollm2_tokenizer):
    with pytest.raises(ConfigError, match="text records take all"):
        data.encode_records(smollm2_tokenizer, TEXT, seq_len=64, train_on="assistant")
    with pytest.raises(ConfigError, match="expected one of"):
        data.encode_records(smollm2_tokenizer, TEXT, seq_len=64, train_on="everything")


def test_bad_input_is_one_line_naming_the_record(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    ends_with_user = {"messages": MULTI_TURN[0]["messages"][:3]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(MULTI_TURN[0]) + "\n" + json.dumps(ends_with_user) + "\n")
    records, _ = data.load_records(str(path))
    with pytest.raises(DataError) as e:
        data.encode_records(tok, records, seq_len=512, train_on="last")
    msg = str(e.value)
    assert "\n" not in msg and f"{path} record 1" in msg and "'user' turn" in msg and "--train_on=assistant" in msg
    # No target left after truncation: right truncation at 8 tokens keeps only the prompt.
    with pytest.raises(DataError) as e:
        data.encode_records(tok, records[:1], seq_len=8, truncation="right")
    assert "\n" not in str(e.value) and f"{path} record 0" in str(e.value) and "raise --seq_len" in str(e.value)
    # An unknown field in --field_map, and a missing file.
    with pytest.raises(DataError, match=r"--field_map names field\(s\) \['question'\].*yours:theirs"):
        data.load_records(str(path), field_map={"question": "prompt"})
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        data.load_records(str(tmp_path / "nope.jsonl"))


def test_a_template_that_rewrites_earlier_turns_is_refused(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    # Like templates that strip reasoning from earlier turns: only the last assistant turn keeps its content.
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last"
                         " %}...{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError, match="not prefixes of each other.*--chat_template"):
        data.encode_records(tok, MULTI_TURN[:1], seq_len=512)
    assert data.encode_records(tok, MULTI_TURN[:1], seq_len=512, train_on="all")[1].num_examples == 1


def test_truncation_modes(smollm2_tokenizer):
    long = {"prompt": "word " * 40, "completion": " end"}
    full = data.encode_example(smollm2_tokenizer, long, seq_len=1000)
    n = len(full["input_ids"])
    cut, stats = data.encode_records(smollm2_tokenizer, [long, PROMPT_COMPLETION[0]], seq_len=n - 10)
    assert cut[0]["input_ids"] == full["input_ids"][10:] and stats.num_truncated == 1  # prompt_left
    right, _ = data.encode_records(smollm2_tokenizer, [long], seq_len=n - 1, truncation="right")
    assert right[0]["input_ids"] == full["input_ids"][:-1]
    kept, stats = data.encode_records(smollm2_tokenizer, [long, PROMPT_COMPLETION[0]], seq_len=n - 1,
                                      truncation="drop")
    assert len(kept) == 1 and (stats.num_dropped, stats.num_truncated) == (1, 1)


def test_preview_marks_targets_and_counts(smollm2_tokenizer, tmp_path):
    examples, stats = data.encode_records(smollm2_tokenizer, CONVERSATIONAL, seq_len=512)
    shown = preview.show_example(smollm2_tokenizer, examples[0], color=False)
    assert shown.endswith("<|im_start|>assistant\n«Hello!<|im_end|>\n»")
    info = preview.token_stats(examples, stats)
    assert info["examples"] == 2 and info["target_tokens"] == sum(sum(e["loss_mask"]) for e in examples)
    assert sum(info["length_histogram"].values()) == 2


def test_chat_template_file_errors(smollm2_tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        targets.use_chat_template_file(copy.deepcopy(smollm2_tokenizer), str(tmp_path / "none.jinja"))


def test_eval_prompts_of_the_new_formats(smollm2_tokenizer):
    tok = smollm2_tokenizer
    got = data.eval_prompts(tok, TEXT[:1] + PROMPT_COMPLETION[:1] + CONVERSATIONAL[:1] + MULTI_TURN[:1])
    assert len(got) == 3  # the text record has no prompt to generate from
    (pc_ids, pc_ref), (conv_ids, conv_ref), (mt_ids, mt_ref) = got
    assert tok.decode(pc_ids) == PROMPT_COMPLETION[0]["prompt"] and pc_ref == " 4"
    assert conv_ref == "Hello!" and tok.decode(conv_ids).endswith("Hi there<|im_end|>\n<|im_start|>assistant\n")
    assert mt_ref == "1, 2, 3" and tok.decode(mt_ids).endswith("And three?<|im_end|>\n<|im_start|>assistant\n")


def test_a_record_of_no_format_is_named_on_the_first_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + json.dumps({"question": "q", "id": 1}) + "\n")
    with pytest.raises(DataError) as e:
        data.load_records(str(path))
    first = str(e.value).splitlines()[0]
    assert first.startswith(f"{path} record 1: matches no format; keys found: ['id', 'question']")
    assert "--field_map" in first and "1 of 2 records" in first


def test_tool_calls_a_template_cannot_render_are_refused_not_dropped(smollm2_tokenizer):
    # SmolLM2's template renders only `content`: the call would vanish from the tokens without a word.
    with pytest.raises(DataError, match="has 'tool_calls', which the chat template never reads.*--chat_template"):
        data.encode_records(smollm2_tokenizer, TOOL_CALLS, seq_len=1024, train_on="all")
    no_calls = [{"messages": MULTI_TURN[0]["messages"], "tools": [WEATHER_TOOL]}]
    with pytest.raises(DataError, match="has 'tools'"):
        data.encode_records(smollm2_tokenizer, no_calls, seq_len=1024)


@pytest.mark.slow  # `python -m experiments.data` in a subprocess on the default model: ~30 s of CPU
def test_the_command_line_dump_matches_trl(trl_sft, smollm2_tokenizer, tmp_path):
    from tests.cli import run_module

    records = tmp_path / "chat.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in MULTI_TURN))
    dump = tmp_path / "dump.jsonl"
    run_module("experiments.data", f"--dataset={records}", "--seq_len=4096", "--train_on=all", f"--dump={dump}")
    ours = [(d["input_ids"], d["loss_mask"]) for d in map(json.loads, dump.read_text().splitlines())]
    _assert_same(ours, trl_sft(MULTI_TURN), smollm2_tokenizer)
