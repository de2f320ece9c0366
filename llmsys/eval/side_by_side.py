"""Stages side by side: the same held-out prompts answered by every stage's export, answer by answer.

The stage report's table gives rates ("stops 0.97", "annotator score -0.12"); this gives the answers
behind them, so that a reader sees what each stage changed in how the model answers the same question.
Every export is asked the same way the probes ask (:mod:`llmsys.eval.probes`): the prompt rendered with
the chat template's generation prompt by the export's own tokenizer, then greedy decoding with the KV
cache until the template's end-of-turn token or ``max_new_tokens`` (fewer where the model's context
ends first). Exports are loaded one at a time, so the cost in memory is one model, whatever the number of
stages.

Per answer:

- ``response``: the decoded text without the final end-of-turn token (template tokens the model wrote in
  the middle stay: they are what "not well-formed" means);
- ``tokens``: generated tokens, the end-of-turn token included (as the probe's ``mean_length`` counts);
- ``stopped``: the answer ended with the end-of-turn token;
- ``format_ok``: the probe's well-formed check (:func:`~llmsys.eval.probes.format_and_stop_rate`: some
  content and no stray template token);
- ``score``: the rule annotator's score of the answer (:class:`~llmsys.rlhf.rewards.RuleAnnotator`, the
  stand-in for human rankers that the alignment stages should please; ``score_name`` ``"annotator"``) or,
  when the prompts' rows carry their ``answer`` (a verifiable task such as ``data=arith``), 1.0 for the
  exact answer and 0.0 otherwise (:func:`~llmsys.rlhf.rewards.exact_answer`; ``"exact_answer"``).

:func:`side_by_side` returns the object of the side-by-side file (``<out>/side_by_side.json``, written
by :mod:`llmsys.pipeline`; the ranking server's ``/compare`` page reads it)::

    {"max_new_tokens": 48, "score_name": "annotator",
     "prompts": ["<the last user message of prompt 1>", ...],
     "stages": ["pretrain", "sft", "dpo", "ppo"],
     "answers": {"sft": [{"response": "...", "tokens": 12, "stopped": true, "format_ok": true,
                          "score": 0.41}, ...], ...}}

``answers[stage][i]`` answers ``prompts[i]``. Every string in it that a model wrote is text to be shown
as text, never as markup.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from llmsys.data import chat_template_for
from llmsys.data.conversations import Messages
from llmsys.eval.probes import format_and_stop_rate, load_export
from llmsys.models.generation import generate
from llmsys.rlhf.rewards import RuleAnnotator, exact_answer

ANNOTATOR_SCORE = "annotator"
EXACT_ANSWER_SCORE = "exact_answer"
ANSWER_FIELD = "answer"


def _question(prompt: Messages, index: int) -> str:
    """The last user message of a prompt: what the annotator reads as the question."""
    users = [message["content"] for message in prompt if message.get("role") == "user"]
    if not users:
        raise ValueError(f"prompt {index} has no user turn to answer")
    return users[-1]


@torch.no_grad()
def _answers(export: Path, prompts: Sequence[Messages], *, max_new_tokens: int, chat_template: str,
             device: str | torch.device, batch_size: int) -> list[tuple[list[int], bool, str, bool]]:
    """``(generated ids, stopped, response text, format_ok)`` per prompt, greedy, from the export at ``export``.
    The model lives only inside this call, so that one export at a time is in memory."""
    model, tokenizer = load_export(export, device)
    template = chat_template_for(tokenizer, chat_template)
    end_of_turn = template.end_of_turn_id
    rendered = [template.generation_prompt(p) for p in prompts]
    # Each answer may take max_new_tokens, or what the model's context leaves after its own prompt: prompts
    # are batched by that limit, so that no answer depends on which other prompts were asked with it.
    limits = [min(max_new_tokens, model.cfg.max_seq_len - len(ids)) for ids in rendered]
    for ids, limit in zip(rendered, limits):
        if limit < 1:
            raise ValueError(f"{export}: a prompt of {len(ids)} tokens leaves no room to answer within the "
                             f"model's max_seq_len={model.cfg.max_seq_len}")
    answers: list = [None] * len(prompts)
    for limit in sorted(set(limits)):
        rows = [i for i, row_limit in enumerate(limits) if row_limit == limit]
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            out = generate(model, [rendered[i] for i in batch], limit, temperature=0.0, eos_id=end_of_turn,
                           pad_id=tokenizer.pad_id)
            for row, i in enumerate(batch):
                ids = out.tokens[row, :int(out.lengths[row])].tolist()
                stopped = bool(out.finished[row])
                text = tokenizer.decode(ids[:-1] if stopped else ids)
                format_ok = format_and_stop_rate([ids], tokenizer, chat_template)["well_formed"] == 1.0
                answers[i] = (ids, stopped, text, format_ok)
    return answers


def side_by_side(exports: Mapping[str, str | Path], prompts: Sequence[Messages], *,
                 metadata: Sequence[Mapping[str, Any]] | None = None, max_new_tokens: int = 48,
                 chat_template: str = "auto", device: str | torch.device = "cpu", batch_size: int = 32) -> dict:
    """Greedy answers of every export (stage name -> export directory, in the order to show) to the same
    ``prompts`` (chat messages ending with a user turn), as the side-by-side file's object (module docstring).

    ``metadata`` (the prompts' rows' fields, aligned with ``prompts``, each with an ``answer``) makes the
    score the exact-answer check; without it the score is the rule annotator's. Writes nothing.
    """
    if not exports:
        raise ValueError("side_by_side needs at least one export")
    if not prompts:
        raise ValueError("side_by_side needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    questions = [_question(prompt, i) for i, prompt in enumerate(prompts)]
    if metadata is not None:
        if len(metadata) != len(prompts):
            raise ValueError(f"metadata has {len(metadata)} rows for {len(prompts)} prompts")
        lacking = [i for i, row in enumerate(metadata) if ANSWER_FIELD not in row]
        if lacking:
            raise ValueError(f"metadata rows {lacking[:5]} have no {ANSWER_FIELD!r} field, which the exact-answer "
                             f"score compares with; pass metadata=None to score with the rule annotator")
    annotator = RuleAnnotator()
    result: dict = {"max_new_tokens": max_new_tokens,
                    "score_name": ANNOTATOR_SCORE if metadata is None else EXACT_ANSWER_SCORE,
                    "prompts": questions, "stages": list(exports), "answers": {}}
    for stage, export in exports.items():
        answers = _answers(Path(export), prompts, max_new_tokens=max_new_tokens, chat_template=chat_template,
                           device=device, batch_size=batch_size)
        texts = [text for _, _, text, _ in answers]
        if metadata is None:
            scores = [annotator.score(question, text, stopped)
                      for question, (_, stopped, text, _) in zip(questions, answers)]
        else:
            scores = exact_answer(questions, texts, [dict(row) for row in metadata])
        result["answers"][stage] = [
            {"response": text, "tokens": len(ids), "stopped": stopped, "format_ok": format_ok, "score": score}
            for (ids, stopped, text, format_ok), score in zip(answers, scores)]
    return result
