"""Training data: ShareGPT streaming, assistant masks from the chat template, splits, self-distillation.

The slow tests use the real ShareGPT file and the real SmolLM2-135M-Instruct tokenizer and model.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_hydra import assets
from hf_hydra.training.data import (
    Conversation,
    iter_json_array,
    load_sharegpt,
    render,
    seeded_sample,
    split_train_validation,
)
from hf_hydra.training.distill import left_pad, load_distilled, prompt_ids, self_distill

END_OF_TURN = "<|im_end|>"
TWO_TURNS = Conversation(
    id="hand",
    messages=(
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Italy?\nAnswer in one word."},
        {"role": "assistant", "content": " Rome 🇮🇹\n"},
    ),
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets.default_base_model_path())


@pytest.fixture(scope="module")
def base_model():
    return AutoModelForCausalLM.from_pretrained(assets.default_base_model_path(), dtype=torch.float32).eval()


def masked_runs(input_ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive masked tokens."""
    runs: list[list[int]] = []
    for k, (token, flag) in enumerate(zip(input_ids, mask, strict=True)):
        if flag and (k == 0 or not mask[k - 1]):
            runs.append([])
        if flag:
            runs[-1].append(token)
    return runs


def assert_mask_is_assistant_text(tokenizer, conversation: Conversation, end_of_turn: str = END_OF_TURN) -> None:
    rendered = render(tokenizer, conversation, max_length=1_000_000, end_of_turn=end_of_turn)
    messages = list(conversation.messages)
    assert rendered.input_ids == tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    runs = masked_runs(rendered.input_ids, rendered.assistant_mask)
    decoded = [tokenizer.decode(run, clean_up_tokenization_spaces=False) for run in runs]
    assert decoded == [m["content"] + end_of_turn for m in messages if m["role"] == "assistant"]
    unmasked = [t for t, flag in zip(rendered.input_ids, rendered.assistant_mask, strict=True) if not flag]
    context = tokenizer.decode(unmasked, clean_up_tokenization_spaces=False)
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in context


# --------------------------------------------------------------------------- ShareGPT streaming


def write_json(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def sharegpt_record(record_id: str, *speakers_and_texts: tuple[str, str]) -> dict:
    return {"id": record_id, "conversations": [{"from": s, "value": v} for s, v in speakers_and_texts]}


@pytest.mark.parametrize("read_chars", [1, 7, 1 << 20])
def test_iter_json_array_drops_the_unfinished_last_item(read_chars: int) -> None:
    items = [{"a": "x" * 30, "n": 1}, {"b": ["é", 2]}, {"c": 3}]
    text = json.dumps(items)
    cut = text[: text.rindex('{"c"') + 5]  # inside the third item
    assert list(iter_json_array(io.StringIO(cut), read_chars)) == items[:2]
    assert list(iter_json_array(io.StringIO(text), read_chars)) == items
    assert list(iter_json_array(io.StringIO("[1, 23"), read_chars)) == [1]  # "23" may go on: dropped


def test_load_sharegpt_maps_roles_and_drops_what_cannot_be_trained(tmp_path: Path) -> None:
    records = [
        sharegpt_record("ok", ("human", "Hi"), ("gpt", "Hello")),
        sharegpt_record("split_tail", ("gpt", "...end of an answer"), ("human", "Q"), ("chatgpt", "A"), ("human", "?")),
        sharegpt_record("system", ("system", "Be brief."), ("user", "Q"), ("bard", "A")),
        sharegpt_record("blank", ("human", "Q"), ("gpt", "  ")),
        sharegpt_record("twice_human", ("human", "Q"), ("human", "Q2"), ("gpt", "A")),
        sharegpt_record("no_answer", ("human", "Q")),
        sharegpt_record("unknown", ("human", "Q"), ("robot", "A")),
        sharegpt_record("ok", ("human", "repeated id"), ("gpt", "A")),
        {"id": "malformed", "conversations": "not a list"},
    ]
    unfinished = json.dumps(sharegpt_record("cut", ("human", "Q"), ("gpt", "A")))[:40]
    text = json.dumps(records, indent=2)[:-1] + ",\n" + unfinished  # the file ends inside a record
    path = write_json(tmp_path / "sharegpt.json", text)
    conversations = load_sharegpt(path=path)
    assert [c.id for c in conversations] == ["ok", "split_tail", "system"]
    assert conversations[0].messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})
    assert [m["role"] for m in conversations[1].messages] == ["user", "assistant"]
    assert [m["role"] for m in conversations[2].messages] == ["system", "user", "assistant"]
    assert [c.id for c in load_sharegpt(2, path=path)] == ["ok", "split_tail"]


def test_load_sharegpt_limit_reads_only_the_start() -> None:
    conversations = load_sharegpt(limit=25)
    assert len(conversations) == 25
    assert len({c.id for c in conversations}) == 25


def test_conversation_rejects_untrainable_chats() -> None:
    with pytest.raises(ValueError, match="alternate"):
        Conversation("x", ({"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}))
    with pytest.raises(ValueError, match="no assistant"):
        Conversation("x", ({"role": "user", "content": "Q"},))


@pytest.mark.slow
def test_load_sharegpt_gives_all_complete_conversations() -> None:
    conversations = load_sharegpt()
    assert 17_000 <= len(conversations) <= 17_700  # 17,671 complete records in the truncated file
    assert len({c.id for c in conversations}) == len(conversations)
    for conversation in conversations:
        turns = [m["role"] for m in conversation.messages if m["role"] != "system"]
        assert turns == ["user", "assistant"] * (len(turns) // 2)
        assert all(m["content"].strip() for m in conversation.messages)


# --------------------------------------------------------------------------- rendering


@pytest.mark.slow
def test_assistant_mask_covers_exactly_the_assistant_text(tokenizer) -> None:
    assert_mask_is_assistant_text(tokenizer, TWO_TURNS)


@pytest.mark.slow
def test_assistant_mask_on_real_sharegpt_conversations(tokenizer) -> None:
    for conversation in load_sharegpt(limit=20):
        assert_mask_is_assistant_text(tokenizer, conversation)


@pytest.mark.slow
def test_assistant_mask_with_another_chat_template(tokenizer) -> None:
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}### Question:\n{{ m['content'] }}\n\n"
        "{% else %}### Answer:\n{{ m['content'] }}<|endoftext|>\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Answer:\n{% endif %}"
    )
    assert_mask_is_assistant_text(other, TWO_TURNS, end_of_turn="<|endoftext|>")


@pytest.mark.slow
def test_render_truncates_to_max_length(tokenizer) -> None:
    full = render(tokenizer, TWO_TURNS, max_length=10_000)
    short = render(tokenizer, TWO_TURNS, max_length=40)
    assert len(short.input_ids) == len(short.assistant_mask) == 40
    assert short.input_ids == full.input_ids[:40]
    assert short.assistant_mask == full.assistant_mask[:40]
    assert 0 < short.num_assistant_tokens < full.num_assistant_tokens


# --------------------------------------------------------------------------- splits


def test_split_is_seeded_deterministic_and_disjoint() -> None:
    items = [f"item{k}" for k in range(101)]
    train, validation = split_train_validation(items, 0.1, seed=3)
    assert (train, validation) == split_train_validation(items, 0.1, seed=3)
    assert len(validation) == 10 and len(train) == 91
    assert set(train).isdisjoint(validation) and set(train) | set(validation) == set(items)
    assert train == sorted(train, key=items.index)  # each part keeps the items' order
    assert split_train_validation(items, 0.1, seed=4)[1] != validation
    with pytest.raises(ValueError):
        split_train_validation(items, 1.0, seed=0)


def test_seeded_sample_continues_the_distilled_sample_without_overlap() -> None:
    items = [f"item{k}" for k in range(101)]
    first = seeded_sample(items, 20, seed=3)
    assert first == split_train_validation(items, 20 / len(items), seed=3)[1]  # what `distill` answers
    more = seeded_sample(items, 30, seed=3, skip=20)
    assert len(more) == 30 and set(more).isdisjoint(first) and more == sorted(more, key=items.index)
    assert set(first) | set(more) == set(seeded_sample(items, 50, seed=3))
    with pytest.raises(ValueError, match="only 101 items"):
        seeded_sample(items, 90, seed=3, skip=20)


def test_prepare_command_spells_out_a_sharegpt_source() -> None:
    from hf_hydra.cli import build_parser, prepare_command

    args = build_parser().parse_args(["prepare", "--sharegpt", "1200", "--skip", "2000", "--out", "features/raw"])
    assert args.data is None and (args.sharegpt, args.seed, args.skip) == (1200, None, 2000)
    assert prepare_command(args) == (
        "hf-hydra prepare --sharegpt 1200 --seed 0 --skip 2000 --out features/raw --max-length 512 --teacher-topk 32"
    )
    with pytest.raises(SystemExit):  # one source only
        build_parser().parse_args(["prepare", "--sharegpt", "5", "--data", "d.jsonl", "--out", "f"])
    for option in (["--skip", "10"], ["--seed", "0"]):  # even the default value, when given, is refused
        distilled = build_parser().parse_args(["prepare", "--data", "d.jsonl", *option, "--out", "f"])
        with pytest.raises(SystemExit, match="use them with --sharegpt"):  # before any model is loaded
            distilled.func(distilled)


# --------------------------------------------------------------------------- self-distillation


def test_left_pad() -> None:
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def distilled_record(record_id: str, *contents: str, truncated: bool = False) -> dict:
    """A line of `self_distill`'s output: alternating user and assistant `contents`."""
    messages = [{"role": ("user", "assistant")[k % 2], "content": text} for k, text in enumerate(contents)]
    return {"id": record_id, "messages": messages, "truncated": truncated}


def test_load_distilled_keeps_the_trainable_prefix(tmp_path: Path) -> None:
    lines = [
        distilled_record("a", "Q1", "A1"),
        distilled_record("b", "Q1", ""),
        distilled_record("c", "Q1", "A1", "Q2", " "),
        distilled_record("d", "Q1", "A1 cut", truncated=True),
    ]
    path = tmp_path / "distilled.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    conversations = load_distilled(path)
    assert [c.id for c in conversations] == ["a", "c", "d"]
    assert len(conversations[1].messages) == 2
    assert [c.id for c in load_distilled(path, drop_truncated=True)] == ["a", "c"]


def greedy_reference(model, tokenizer, question: str, max_new_tokens: int) -> tuple[str, bool]:
    """Plain unbatched `model.generate` greedy answer, cut at the end of turn."""
    input_ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": question}])])  # (1, L)
    out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, input_ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    finished = eos in new
    text = tokenizer.decode(new[: new.index(eos)] if finished else new, clean_up_tokenization_spaces=False)
    return text, not finished


@pytest.mark.slow
def test_self_distill_writes_resumes_and_matches_greedy_generate(tmp_path: Path, base_model, tokenizer) -> None:
    questions = {"q1": "What is 2 + 2?", "q2": "Name one primary colour.", "q3": "Write a haiku about the sea."}
    conversations = [
        Conversation(id, ({"role": "user", "content": q}, {"role": "assistant", "content": "(dataset answer)"}))
        for id, q in questions.items()
    ]
    out = tmp_path / "distilled.jsonl"
    report = self_distill(base_model, tokenizer, conversations, out, max_new_tokens=8, batch_size=2)
    assert report.written == 3 and report.already_done == 0 and report.generated_tokens > 0
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in records) == ["q1", "q2", "q3"]
    for record in records:
        user, assistant = record["messages"]
        assert user == {"role": "user", "content": questions[record["id"]]}
        assert assistant["role"] == "assistant" and END_OF_TURN not in assistant["content"]
        expected = greedy_reference(base_model, tokenizer, user["content"], max_new_tokens=8)
        assert (assistant["content"], record["truncated"]) == expected

    with out.open("a", encoding="utf-8") as f:
        f.write('{"id": "q4", "mess')  # a line cut off by an interrupted run
    again = self_distill(base_model, tokenizer, conversations, out, max_new_tokens=8, batch_size=2)
    assert again.written == 0 and again.already_done == 3
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == records
    assert [c.id for c in load_distilled(out)] == [r["id"] for r in records]


def test_cli_prepare_records_its_command_and_training_carries_it_to_the_card(tmp_path: Path, tokenizer) -> None:
    from conftest import make_tiny_model

    from hf_hydra.cli import main
    from hf_hydra.training.arguments import TrainingArguments
    from hf_hydra.training.features import FeatureStore
    from hf_hydra.training.trainer import train

    base_dir, data, features, heads = tmp_path / "base", tmp_path / "d.jsonl", tmp_path / "f", tmp_path / "h"
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    lines = [distilled_record(str(k), f"Question {k}?", f"Answer number {k} is short.") for k in range(4)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    assert main(["prepare", "--data", str(data), "--out", str(features), "--base", str(base_dir)]) == 0
    assert len(FeatureStore(features)) == 4
    command = (f"hf-hydra prepare --data {data} --out {features} --max-length 512 --teacher-topk 32 "
               f"--base {base_dir}")
    record = json.loads((features / "preparation.json").read_text())
    assert record.keys() == {"command", "cpu_seconds"} and record["command"] == command and record["cpu_seconds"] > 0

    args = TrainingArguments(features_dir=str(features), output_dir=str(heads), base_model=str(base_dir),
                             num_heads=2, draft_vocab_size=16, max_steps=1, batch_size=2,
                             gradient_accumulation_steps=1, validation_fraction=0.25, save_every=0)
    train(args)
    assert json.loads((heads / "preparation.json").read_text()) == record
    card = (heads / "README.md").read_text()
    assert f"{command}\nhf-hydra train --features-dir {features} --output-dir heads/ " in card
    assert f"Preparing the features took {record['cpu_seconds'] / 3600:.2f} CPU hours" in card
