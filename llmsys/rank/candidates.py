"""What a person ranks: items of K sampled responses to one prompt, with ids every process agrees on.

**An item** is one prompt and K distinct responses, plus how they were made (the model directory and
the sampling settings) and, per response, its length in tokens and whether it stopped at the
template's end-of-turn token. Its id is a hash of the prompt and the responses in their order
(:func:`item_id`), so a restarted server, a second server on the same rankings file and ``stats``
all name an item alike without any shared state.

**The candidates file** (``python -m llmsys.rank sample --out FILE``; ``serve --model`` writes
``<rankings>.candidates``) is JSON Lines, one item per line::

    {"id": "3f2a...", "prompt": "How are you?", "responses": ["...", "...", "...", "..."],
     "tokens": [12, 7, 48, 9], "stopped": [true, true, false, true],
     "model": "outputs/sft-tiny-chat/final",
     "sampling": {"k": 4, "max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "seed": 0}}

``prompt`` takes the preference reader's form (a text for one user turn, else the chat messages), so a
ranking row copies it unchanged and ``stage=reward`` renders it with the same chat template the SFT
model was trained with. A file written by hand needs only ``prompt`` and ``responses``; each line is
checked as the preference reader will check the ranking made of it (distinct, non-empty responses).

**Sampling** (:func:`sample_items`) asks the export each prompt through its chat template's
generation prompt and draws K answers (temperature / top-p, one seeded generator: the same export,
prompts and seed give the same items on the same device). The preference reader rejects a ranking
of two equal responses, and a small model often repeats itself, so duplicates and empty answers are
drawn again, a few rounds at most; a prompt that still lacks K distinct answers is left out and
reported.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmsys.config.schema import DataConfig
from llmsys.data import DataError, Tokenizer, chat_template_for
from llmsys.data.conversations import Messages
from llmsys.data.preference import prompt_messages, row_to_pairs
from llmsys.data.prompts import iter_prompts
from llmsys.data.sources import read_jsonl_rows
from llmsys.models import Transformer
from llmsys.models.generation import generate

logger = logging.getLogger(__name__)

# Rounds of re-drawing duplicate or empty answers before a prompt is left out: with 4 rounds a model
# whose answers repeat half the time still fills K=4 distinct ones for most prompts.
SAMPLING_ROUNDS = 4


@dataclass(frozen=True)
class Item:
    """One prompt with K responses to rank (see the module docstring for the fields)."""

    id: str
    prompt: str | list[dict[str, str]]
    responses: tuple[str, ...]
    tokens: tuple[int, ...] | None = None
    stopped: tuple[bool, ...] | None = None
    model: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> Messages:
        """The prompt as chat messages (what the page shows, turn by turn)."""
        return prompt_messages({"prompt": self.prompt}, f"item {self.id}")

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "responses": list(self.responses)}
        if self.tokens is not None:
            row["tokens"] = list(self.tokens)
        if self.stopped is not None:
            row["stopped"] = list(self.stopped)
        row.update(model=self.model, sampling=self.sampling)
        return row


def prompt_field(messages: Messages) -> str | list[dict[str, str]]:
    """The ``prompt`` of a preference row for ``messages``: the text of a lone user turn, else the messages."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return [dict(message) for message in messages]


def item_id(prompt: str | list[dict[str, str]], responses: Sequence[str]) -> str:
    """A stable id of a prompt and its responses in order: the first 16 hex digits of a SHA-256."""
    blob = json.dumps([prompt, list(responses)], ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def make_item(prompt: str | list[dict[str, str]], responses: Sequence[str], **fields: Any) -> Item:
    return Item(id=item_id(prompt, responses), prompt=prompt, responses=tuple(responses), **fields)


# -- the candidates file ---------------------------------------------------------------------------


def _per_response(row: dict, where: str, name: str, kind: type, k: int) -> tuple | None:
    value = row.get(name)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != k
            or not all(isinstance(v, kind) and (kind is bool or not isinstance(v, bool)) for v in value)):
        raise DataError(f"{where}: field {name!r} is {value!r}, expected a list of {k} {kind.__name__}s "
                        f"(one per response)")
    return tuple(value)


def item_from_row(row: Any, where: str) -> Item:
    """Check one candidates line (the preference reader's checks of its ranking, plus the fields above)."""
    if not isinstance(row, dict) or "prompt" not in row or "responses" not in row:
        raise DataError(f"{where}: expected an object with 'prompt' and 'responses' (a candidates line)")
    responses = row["responses"]
    k = len(responses) if isinstance(responses, list) else 0
    # The ranking the page will produce must be readable by stage=reward: check it the way that reader does.
    row_to_pairs({"prompt": row["prompt"], "responses": responses, "ranking": list(range(k))}, where)
    computed = item_id(row["prompt"], responses)
    if row.get("id") is not None and row["id"] != computed:
        raise DataError(f"{where}: field 'id' is {row['id']!r} but its prompt and responses hash to {computed!r}; "
                        f"remove the id or the edit")
    sampling = row.get("sampling") or {}
    model = row.get("model")
    if not isinstance(sampling, dict) or not (model is None or isinstance(model, str)):
        raise DataError(f"{where}: expected 'sampling' to be an object and 'model' a string or null")
    return Item(id=computed, prompt=row["prompt"], responses=tuple(responses),
                tokens=_per_response(row, where, "tokens", int, k), stopped=_per_response(row, where, "stopped", bool, k),
                model=model, sampling=sampling)


def read_candidates(path: Path | str) -> list[Item]:
    """The items of a candidates file, in file order; a :class:`DataError` naming ``file:line`` on a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such candidates file; write one with `python -m llmsys.rank sample`")
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for line_no, row in read_jsonl_rows(path, "'prompt' and 'responses' (a candidates line)"):
        where = f"{path}:{line_no}"
        item = item_from_row(row, where)
        if item.id in first_line:
            raise DataError(f"{where}: the same prompt and responses as line {first_line[item.id]}; "
                            f"each item once")
        first_line[item.id] = line_no
        items.append(item)
    if not items:
        raise DataError(f"{path}: no items; expected one JSON object per line with 'prompt' and 'responses'")
    return items


def write_candidates(path: Path | str, items: Iterable[Item]) -> Path:
    """Write the items (temporary file, fsync, rename: a crash never leaves half a file under ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as stream:
        for item in items:
            stream.write(json.dumps(item.to_row(), ensure_ascii=False) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    return path


# -- prompts and sampling --------------------------------------------------------------------------


def read_prompts(path: Path | str) -> list[Messages]:
    """The distinct prompts of ``path``, in order: a ``.txt`` file gives one prompt per non-blank line;
    ``.jsonl``/``.parquet``/chatterbot YAML files (or a folder) are read as the online stages read prompts
    (:func:`llmsys.data.prompts.iter_prompts`: ``{"prompt"}`` rows, preference or SFT chat rows)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        found = [[{"role": "user", "content": line.strip()}]
                 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        found = [messages for _, messages in iter_prompts(DataConfig(name="files", path=str(path)))]
    prompts: list[Messages] = []
    seen: set[str] = set()
    for messages in found:
        key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(messages)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


@dataclass(frozen=True)
class Sampling:
    """How the K candidates of a prompt are drawn (recorded in every item and ranking row)."""

    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"--k is {self.k}; a ranking needs at least 2 responses")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens is {self.max_new_tokens}; expected at least 1")
        if self.temperature <= 0:
            raise ValueError(f"--temperature is {self.temperature}; K different answers need sampling (> 0)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p is {self.top_p}; expected a value in (0, 1]")

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}


@torch.no_grad()
def sample_items(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages], sampling: Sampling, *,
                 model_name: str, chat_template: str = "auto",
                 batch_size: int = 32) -> tuple[list[Item], list[str]]:
    """K distinct answers per prompt (see the module docstring); ``(items, prompts left out, as text)``."""
    template = chat_template_for(tokenizer, chat_template)
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    items: list[Item] = []
    left_out: list[str] = []
    per_batch = max(1, batch_size // sampling.k)
    for start in range(0, len(prompts), per_batch):
        batch = list(prompts[start:start + per_batch])
        ids = [template.generation_prompt(messages) for messages in batch]
        room = model.cfg.max_seq_len - max(len(p) for p in ids)
        if room < 1:
            raise DataError(f"a prompt of {max(len(p) for p in ids)} tokens leaves no room to answer within the "
                            f"model's max_seq_len={model.cfg.max_seq_len}")
        drawn: list[dict[str, tuple[int, bool]]] = [{} for _ in batch]  # text -> (tokens, stopped), in order
        for _ in range(SAMPLING_ROUNDS):
            rows = [index for index, got in enumerate(drawn) for _ in range(sampling.k - len(got))]
            if not rows:
                break
            out = generate(model, [ids[index] for index in rows], min(sampling.max_new_tokens, room),
                           temperature=sampling.temperature, top_p=sampling.top_p,
                           eos_id=template.end_of_turn_id, pad_id=tokenizer.pad_id, generator=generator)
            for row, index in enumerate(rows):
                n, stopped = int(out.lengths[row]), bool(out.finished[row])
                text = tokenizer.decode(out.tokens[row, :n - int(stopped)].tolist())
                if text.strip() and text.strip() not in {t.strip() for t in drawn[index]} \
                        and len(drawn[index]) < sampling.k:
                    drawn[index][text] = (n, stopped)
        for messages, got in zip(batch, drawn):
            if len(got) < sampling.k:
                left_out.append(messages[-1]["content"])
                continue
            items.append(make_item(prompt_field(messages), list(got), tokens=tuple(n for n, _ in got.values()),
                                   stopped=tuple(s for _, s in got.values()), model=model_name,
                                   sampling=sampling.as_dict()))
    if left_out:
        logger.warning("%d of %d prompts left out: fewer than %d distinct non-empty answers after %d rounds",
                       len(left_out), len(prompts), sampling.k, SAMPLING_ROUNDS)
    return items, left_out
