"""``python -m llmsys.generate DIR --prompts FILE --out FILE.jsonl``: a model's answers to a file of prompts.

``DIR`` is any stage's export (``<output_dir>/final``) or a Hugging Face Llama-family directory
(converted in memory by :mod:`llmsys.models.hf`). Each prompt is asked through the model's own chat
template (``llmsys.data.templates.chat_template_for(tokenizer, "auto")``: the tokenizer's Jinja
template, else llmsys's ChatML) and answered until the template's end-of-turn token or
``--max-new-tokens``, in batches that share one forward pass per token (``llmsys.models.generation``,
KV cache).

**Prompts.** A ``.txt`` file holds one prompt (a user turn) per non-blank line. Any other file is JSON
Lines, one object per line: ``{"prompt": "text"}`` (optionally with ``"system": "text"``), or
``{"prompt": [messages]}`` / ``{"messages": [{"role", "content"}, ...]}``, a conversation ending with the
user turn to answer. A bad line fails with ``file:line`` and what was expected.

**Output.** JSON Lines in the prompts' order, one row per prompt::

    {"prompt": "How are you?", "response": "I am fine.", "tokens": 6, "finished": true,
     "model": "outputs/pipeline/sft/final", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 0}

``prompt`` is the row's prompt as given (a text or the messages), ``response`` the answer's text
without the end-of-turn token, ``tokens`` the generated tokens (the end of turn included) and
``finished`` whether it ended its turn (else it hit the limit). The file is written whole to a
temporary sibling and renamed, so an interrupted run leaves no half-written output.

**Context.** A prompt leaves ``max_seq_len - len(prompt)`` positions to answer in; one that leaves less
than ``--max-new-tokens`` is answered within what it leaves (with prompts of the same limit, so no
prompt is cut short by a longer one in its batch) and one that leaves none is an error. Sampling draws
from one generator seeded with ``--seed``: the same export, prompts, settings and device give the same
file; ``--temperature 0`` is greedy.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from llmsys.data import DataError, Tokenizer, chat_template_for
from llmsys.data.conversations import Messages, user_turn_messages
from llmsys.data.preference import prompt_messages
from llmsys.data.sources import json_type, read_jsonl_rows
from llmsys.data.templates import ChatMLTemplate, HFChatTemplate
from llmsys.eval.probes import load_export
from llmsys.models import Transformer
from llmsys.models.generation import generate
from llmsys.models.heads import is_scalar_export

EXPECTED_PROMPT_ROW = ('{"prompt": "text"} (optionally with "system"), or {"messages": [{"role", "content"}, ...]} '
                       "ending with a user turn")


# -- what both command-line apps share (llmsys.chat imports these) -----------------------------------------


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn (recorded in every output row)."""

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature is {self.temperature}; expected >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p is {self.top_p}; expected a value in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens is {self.max_new_tokens}; expected at least 1")

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``DIR``, ``--device`` and the sampling flags (:class:`Sampling`'s fields)."""
    parser.add_argument("model_dir", metavar="DIR", type=Path,
                        help="an llmsys export (<output_dir>/final) or a Hugging Face Llama-family directory")
    defaults = Sampling()
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help=f"sampling temperature; 0 is greedy (default {defaults.temperature})")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help=f"nucleus sampling mass, in (0, 1] (default {defaults.top_p})")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"longest answer in tokens (default {defaults.max_new_tokens}; the model's context "
                             "may allow fewer)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed of the sampling generator (default {defaults.seed})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def sampling_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Sampling:
    try:
        return Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                        seed=args.seed)
    except ValueError as error:
        parser.error(str(error))


Template = ChatMLTemplate | HFChatTemplate


def load_chat_model(path: Path, device: Optional[str]) -> tuple[Transformer, Tokenizer, Template]:
    """The language model at ``path`` in eval mode on ``device``, its tokenizer and its chat template."""
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: no config.json; expected an llmsys export (<output_dir>/final) or a Hugging "
                        "Face model directory")
    if is_scalar_export(path):
        raise DataError(f"{path}: a reward model or critic (a scalar head, not a language model); expected an "
                        "export of pretrain, sft, dpo, ppo or grpo")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_export(path, device)
    return model, tokenizer, chat_template_for(tokenizer, "auto")


def answer_text(tokenizer: Tokenizer, ids: Sequence[int], finished: bool) -> str:
    """The text of a generated answer, without the end-of-turn token that finished it."""
    return tokenizer.decode(list(ids[:len(ids) - int(finished)]))


# -- prompts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    where: str  # file:line
    given: str | list[dict[str, str]]  # the row's prompt as given, copied into the output
    messages: Messages


def _conversation(row: dict, where: str) -> Messages:
    raw = row["messages"]
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'messages' is a {json_type(raw)}, expected a list of "
                        "{'role', 'content'} objects")
    if "system" in row:
        raise DataError(f"{where}: field 'system' is only allowed with a text 'prompt'; put the system message "
                        "into 'messages' instead")
    return user_turn_messages(raw, where, "messages")


def read_prompts(path: Path) -> list[Prompt]:
    """The prompts of ``path`` in order (see the module docstring)."""
    if not path.is_file():
        raise DataError(f"{path}: not a file; expected a .txt file (one prompt per line) or JSON Lines with "
                        f"{EXPECTED_PROMPT_ROW}")
    prompts: list[Prompt] = []
    if path.suffix.lower() == ".txt":
        for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_no}: not UTF-8 ({error.reason} at byte {error.start} of the line); "
                                "expected UTF-8 text, one prompt per line") from None
            if line:
                prompts.append(Prompt(f"{path}:{line_no}", line, [{"role": "user", "content": line}]))
    else:
        for line_no, row in read_jsonl_rows(path, EXPECTED_PROMPT_ROW):
            where = f"{path}:{line_no}"
            if ("prompt" in row) == ("messages" in row):
                present = ", ".join(repr(key) for key in row) or "none"
                raise DataError(f"{where}: {'both' if 'prompt' in row else 'neither'} 'prompt' and 'messages' "
                                f"(fields present: {present}); expected {EXPECTED_PROMPT_ROW}")
            if "messages" in row:
                prompts.append(Prompt(where, row["messages"], _conversation(row, where)))
            else:
                prompts.append(Prompt(where, row["prompt"], prompt_messages(row, where)))
    if not prompts:
        raise DataError(f"{path}: no prompts; expected a .txt file (one prompt per line) or JSON Lines with "
                        f"{EXPECTED_PROMPT_ROW}")
    return prompts


# -- answering ----------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_prompts(model: Transformer, tokenizer: Tokenizer, template: Template, prompts: Sequence[Prompt],
                   sampling: Sampling, batch_size: int) -> list[dict[str, Any]]:
    """One output row per prompt, in order (the module docstring's rows, without ``model``)."""
    ids = [template.generation_prompt(prompt.messages) for prompt in prompts]
    limit = model.cfg.max_seq_len
    budgets = [min(sampling.max_new_tokens, limit - len(p)) for p in ids]
    for prompt, p, budget in zip(prompts, ids, budgets):
        if budget < 1:
            raise DataError(f"{prompt.where}: the prompt is {len(p)} tokens, which leaves no room to answer within "
                            f"the model's max_seq_len={limit}")
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    rows: dict[int, dict[str, Any]] = {}
    for budget in sorted(set(budgets), reverse=True):  # prompts that share a limit share batches
        group = [index for index, b in enumerate(budgets) if b == budget]
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            out = generate(model, [ids[index] for index in batch], budget, temperature=sampling.temperature,
                           top_p=sampling.top_p, eos_id=template.end_of_turn_id, pad_id=tokenizer.pad_id,
                           generator=generator)
            for row, index in enumerate(batch):
                n, finished = int(out.lengths[row]), bool(out.finished[row])
                rows[index] = {"prompt": prompts[index].given,
                               "response": answer_text(tokenizer, out.tokens[row, :n].tolist(), finished),
                               "tokens": n, "finished": finished}
    return [rows[index] for index in range(len(prompts))]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON Lines to a temporary sibling, flush it to disk, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmsys.generate", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--prompts", type=Path, required=True,
                        help="a .txt file (one prompt per line) or JSON Lines with 'prompt' or 'messages'")
    parser.add_argument("--out", type=Path, required=True, help="the JSON Lines file to write")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    args = parser.parse_args(argv)
    sampling = sampling_from(args, parser)
    if args.batch_size < 1:
        parser.error(f"--batch-size is {args.batch_size}; expected at least 1")
    try:
        prompts = read_prompts(args.prompts)
        model, tokenizer, template = load_chat_model(args.model_dir, args.device)
        rows = answer_prompts(model, tokenizer, template, prompts, sampling, args.batch_size)
    except (DataError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"llmsys.generate: {error}") from None
    settings = {"model": str(args.model_dir), **sampling.as_dict()}
    write_jsonl(args.out, [{**row, **settings} for row in rows])
    finished = sum(row["finished"] for row in rows)
    print(f"{args.out}: {len(rows)} answers, {finished} ended their turn", file=sys.stderr)


if __name__ == "__main__":
    main()
