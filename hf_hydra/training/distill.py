"""Self-distillation: replace the dataset's answers with the base model's own greedy answers.

Heads must predict what the base model says, not what ChatGPT said (Medusa's recipe), so each
conversation's user turns are answered again by the base, greedily, in left-padded batches. Results
are appended to a JSONL file, one conversation per line, flushed after every batch:

    {"id": "QWJhYvA_0", "messages": [{"role": "user", ...}, {"role": "assistant", ...}], "truncated": false}

A rerun with the same file skips the ids already in it, so an interrupted run resumes. An answer is
stored without its end-of-turn token; "truncated" says the last answer hit `max_new_tokens` first.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .data import Conversation, Message, conversation_problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillSettings:
    max_new_tokens: int  # per answer
    batch_size: int  # conversations generated together
    max_prompt_tokens: int  # longer prompts are skipped (first turn) or end the conversation (later turns)
    max_turns: int  # user turns answered per conversation (1: the first question only)


@dataclass(frozen=True)
class DistillReport:
    written: int  # conversations appended to the file by this run
    already_done: int  # conversations skipped because their id was in the file
    prompt_too_long: int  # conversations skipped because their first prompt exceeds max_prompt_tokens
    generated_tokens: int  # answer tokens the base generated, end-of-turn tokens included, padding not
    seconds: float  # wall time of the generation loop

    @property
    def generated_tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Answer:
    """One generated answer: its tokens before the end of turn, and whether the turn ended."""

    token_ids: list[int]
    finished: bool  # False if generation stopped at max_new_tokens

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) + self.finished  # the end-of-turn token was generated too


# --------------------------------------------------------------------------- generation


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    if eos is None:
        raise ValueError("neither the model's generation_config nor the tokenizer names an eos token")
    return [eos] if isinstance(eos, int) else list(eos)


def greedy_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding up to `max_new_tokens`, stopping at the model's end-of-turn token(s)."""
    eos = _eos_ids(model, tokenizer)
    pad = model.generation_config.pad_token_id
    pad = tokenizer.pad_token_id if pad is None else pad
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos,
        pad_token_id=eos[0] if pad is None else pad,
    )


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as (input_ids, attention_mask), both (B, L), padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, L)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def _answer(new_tokens: list[int], eos_ids: Sequence[int]) -> Answer:
    """Cut a row of generated tokens at its first end-of-turn token (the rest is padding)."""
    for k, token in enumerate(new_tokens):
        if token in eos_ids:
            return Answer(token_ids=new_tokens[:k], finished=True)
    return Answer(token_ids=new_tokens, finished=False)


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], generation_config: GenerationConfig
) -> list[Answer]:
    """Greedy answers to a batch of tokenized prompts, one `model.generate` call."""
    input_ids, attention_mask = left_pad(prompts, generation_config.pad_token_id)  # (B, L)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    new_tokens = out[:, input_ids.shape[1] :].tolist()  # (B, n)
    return [_answer(row, generation_config.eos_token_id) for row in new_tokens]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """The chat so far in the model's template, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_dict=True)["input_ids"]


# --------------------------------------------------------------------------- conversations


@dataclass
class _Dialog:
    """A conversation being regenerated: the user turns to answer and the chat so far."""

    id: str
    questions: list[Message]
    messages: list[Message]
    truncated: bool = False

    def record(self) -> dict:
        return {"id": self.id, "messages": self.messages, "truncated": self.truncated}


def _fitting_prompts(
    tokenizer: PreTrainedTokenizerBase, dialogs: list[_Dialog], max_prompt_tokens: int
) -> tuple[list[_Dialog], list[list[int]]]:
    """The dialogs whose next prompt fits in `max_prompt_tokens`, with those prompts. A dialog whose
    prompt (a later turn) no longer fits ends before that turn: its last user message is removed."""
    fitting, prompts = [], []
    for dialog in dialogs:
        ids = prompt_ids(tokenizer, dialog.messages)
        if len(ids) <= max_prompt_tokens:
            fitting.append(dialog)
            prompts.append(ids)
        else:
            dialog.messages.pop()
    return fitting, prompts


def _answer_round(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dialogs: list[_Dialog], settings: DistillSettings
) -> tuple[list[_Dialog], int]:
    """Answer the last user turn of every dialog; return the dialogs that go on and the tokens generated."""
    dialogs, prompts = _fitting_prompts(tokenizer, dialogs, settings.max_prompt_tokens)
    config = greedy_config(model, tokenizer, settings.max_new_tokens)
    answers = generate_answers(model, prompts, config) if dialogs else []
    going_on = []
    for dialog, answer in zip(dialogs, answers, strict=True):
        text = tokenizer.decode(answer.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        dialog.messages.append({"role": "assistant", "content": text})
        dialog.truncated = not answer.finished
        turn = len(dialog.messages) // 2
        if answer.finished and text.strip() and turn < min(settings.max_turns, len(dialog.questions)):
            dialog.messages.append(dialog.questions[turn])
            going_on.append(dialog)
    return going_on, sum(a.num_generated for a in answers)


def _distill_batch(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch: list[Conversation], settings: DistillSettings
) -> tuple[list[dict], int]:
    """Regenerate up to `settings.max_turns` answers of each conversation; return the records and tokens."""
    dialogs = [_Dialog(c.id, questions, questions[:1]) for c in batch for questions in [c.user_turns()]]
    active, generated = dialogs, 0
    while active:
        active, tokens = _answer_round(model, tokenizer, active, settings)
        generated += tokens
    return [d.record() for d in dialogs], generated


# --------------------------------------------------------------------------- the JSONL file


def _done_ids(path: Path) -> set[str]:
    """Ids already in the output file; a last line cut off by an interrupted run is removed first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        logger.warning("Removing an unfinished last line from %s (an interrupted run)", path)
        with path.open("r+b") as f:
            f.truncate(len(complete))
    return {json.loads(line)["id"] for line in complete.decode("utf-8").splitlines() if line.strip()}


def _load(
    model_path_or_model: str | Path | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if isinstance(model_path_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(model_path_or_model, dtype=torch.float32)
    else:
        model = model_path_or_model
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model.name_or_path)
    return model.eval(), tokenizer


def _pending(
    tokenizer: PreTrainedTokenizerBase, conversations: Iterable[Conversation], done: set[str], max_prompt_tokens: int
) -> tuple[list[Conversation], int, int]:
    """Conversations still to do, longest first prompt first; how many were done; how many are too long."""
    todo: dict[str, tuple[int, Conversation]] = {}
    already, too_long = 0, 0
    for conversation in conversations:
        if conversation.id in done:
            already += 1
            continue
        length = len(prompt_ids(tokenizer, conversation.user_turns()[:1]))
        if length > max_prompt_tokens:
            too_long += 1
            continue
        todo.setdefault(conversation.id, (length, conversation))
    ordered = sorted(todo.values(), key=lambda item: -item[0])  # similar lengths batch together: little padding
    return [conversation for _, conversation in ordered], already, too_long


def self_distill(
    model_path_or_model: str | Path | PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    conversations: Iterable[Conversation],
    out_path: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    max_prompt_tokens: int = 1024,
    max_turns: int = 1,
) -> DistillReport:
    """Answer each conversation's user turns with the base model, greedily; append them to `out_path`.

    Args:
        model_path_or_model: the base model, or a folder / Hub id to load it from (float32).
        tokenizer: its tokenizer (with chat template); None loads it from the model's folder.
        conversations: the questions; their answers are ignored.
        out_path: a JSONL file; ids already in it are skipped, so a rerun resumes.
        max_new_tokens: the longest answer; longer ones are cut and marked "truncated".
        batch_size: prompts per `generate` call (prompts are sorted by length to limit padding).
        max_prompt_tokens: conversations whose first prompt is longer are skipped.
        max_turns: user turns answered per conversation; later turns see the base's earlier answers.
    """
    if min(max_new_tokens, batch_size, max_prompt_tokens, max_turns) < 1:
        raise ValueError("max_new_tokens, batch_size, max_prompt_tokens and max_turns must all be >= 1")
    settings = DistillSettings(max_new_tokens, batch_size, max_prompt_tokens, max_turns)
    model, tokenizer = _load(model_path_or_model, tokenizer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    todo, already, too_long = _pending(tokenizer, conversations, _done_ids(out_path), max_prompt_tokens)
    logger.info("Self-distillation: %d to do, %d already in %s, %d prompts too long", len(todo), already,
                out_path, too_long)
    start, generated = time.perf_counter(), 0
    with out_path.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="self-distill", unit="conv") as bar:
        for first in range(0, len(todo), batch_size):
            records, tokens = _distill_batch(model, tokenizer, todo[first : first + batch_size], settings)
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            generated += tokens
            bar.update(len(records))
            bar.set_postfix(tokens_per_s=f"{generated / (time.perf_counter() - start):.1f}")
    report = DistillReport(len(todo), already, too_long, generated, time.perf_counter() - start)
    logger.info("Self-distillation: %d conversations, %d tokens, generated_tokens_per_second=%.1f",
                report.written, report.generated_tokens, report.generated_tokens_per_second)
    return report


def load_distilled(path: str | Path, drop_truncated: bool = False) -> list[Conversation]:
    """The conversations written by `self_distill`, in file order.

    Each keeps its longest trainable prefix: a blank answer ends it there (with its question), and a
    conversation without any non-blank answer is dropped (counted in the log). `drop_truncated` also
    drops conversations whose last answer hit `max_new_tokens`.
    """
    conversations, dropped = [], 0
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            messages = _trainable_prefix(record["messages"])
            if not messages or (drop_truncated and record.get("truncated", False)):
                dropped += 1
                continue
            conversations.append(Conversation(id=record["id"], messages=tuple(messages)))
    logger.info("Loaded %d self-distilled conversations from %s (%d dropped)", len(conversations), path, dropped)
    return conversations


def _trainable_prefix(messages: list[Message]) -> list[Message]:
    """The longest prefix ending with an assistant message that is a trainable chat ([] if none)."""
    for end in range(len(messages), 0, -1):
        if messages[end - 1]["role"] == "assistant" and conversation_problem(messages[:end]) is None:
            return messages[:end]
    return []
