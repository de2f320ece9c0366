"""The stages side by side: the pipeline's ``side_by_side.json``, checked, for the ``/compare`` page.

The file (written by :mod:`llmsys.eval.side_by_side`) answers the same held-out prompts with every stage's
export::

    {"max_new_tokens": 48, "score_name": "annotator", "prompts": ["...", ...],
     "stages": ["base", "sft", "dpo", "ppo"],
     "answers": {"sft": [{"response": "...", "tokens": 12, "stopped": true, "format_ok": true,
                          "score": 0.41}, ...], ...}}

``answers[stage][i]`` answers ``prompts[i]``; ``score`` may be null. Everything is checked when the server
starts (a wrong field fails naming it), and each stage gets a summary row (mean tokens, stop and format
rates, mean score) computed here, so the page only lays out what it is given. Every string is model
output: the page renders it as text, never as markup.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class CompareError(ValueError):
    """The side-by-side file cannot be shown; the message names the file and the field."""


def _expect(ok: bool, where: str, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise CompareError(f"{where}: field {field} is {json.dumps(value, ensure_ascii=False)[:80]}, expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_side_by_side(path: Path | str) -> dict[str, Any]:
    """The checked file with a ``summary`` per stage added (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(f"{path}: no such side-by-side file (the pipeline writes <out>/side_by_side.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"{path}: not JSON ({err})") from None
    where = str(path)
    _expect(isinstance(data, dict), where, "(top level)", type(data).__name__, "an object")
    for key in ("prompts", "stages", "answers"):
        if key not in data:
            raise CompareError(f"{where}: missing field {key!r}; expected prompts, stages, answers "
                               f"(and max_new_tokens, score_name)")
    prompts, stages, answers = data["prompts"], data["stages"], data["answers"]
    _expect(isinstance(prompts, list) and all(isinstance(p, str) for p in prompts), where, "prompts", prompts,
            "a list of texts")
    _expect(isinstance(stages, list) and bool(stages) and all(isinstance(s, str) for s in stages)
            and len(set(stages)) == len(stages), where, "stages", stages, "a list of distinct stage names")
    _expect(isinstance(answers, dict), where, "answers", answers, "an object: stage -> list of answers")
    _expect(data.get("max_new_tokens") is None or _is_int(data["max_new_tokens"]), where, "max_new_tokens",
            data.get("max_new_tokens"), "an integer")
    _expect(data.get("score_name") is None or isinstance(data["score_name"], str), where, "score_name",
            data.get("score_name"), "a text")
    for stage in answers:
        _expect(stage in stages, where, f"answers.{stage}", stage, f"one of the stages {stages}")
    summary: dict[str, dict[str, Any]] = {}
    for stage in stages:
        rows = answers.get(stage)
        if rows is None:
            raise CompareError(f"{where}: missing field answers.{stage}; every stage needs its answers")
        _expect(isinstance(rows, list) and len(rows) == len(prompts), where, f"answers.{stage}",
                f"{len(rows)} answers" if isinstance(rows, list) else rows, f"a list of {len(prompts)} answers "
                f"(one per prompt)")
        for index, answer in enumerate(rows):
            at = f"answers.{stage}[{index}]"
            _expect(isinstance(answer, dict), where, at, answer, "an object")
            _expect(isinstance(answer.get("response"), str), where, f"{at}.response", answer.get("response"), "a text")
            _expect(_is_int(answer.get("tokens")) and answer["tokens"] >= 0, where, f"{at}.tokens",
                    answer.get("tokens"), "a count of tokens")
            for flag in ("stopped", "format_ok"):
                _expect(isinstance(answer.get(flag), bool), where, f"{at}.{flag}", answer.get(flag), "true or false")
            score = answer.get("score")
            _expect(score is None or (isinstance(score, (int, float)) and not isinstance(score, bool)
                                      and math.isfinite(score)), where, f"{at}.score", score, "a number or null")
        scores = [a["score"] for a in rows if a.get("score") is not None]
        n = max(len(rows), 1)
        summary[stage] = {"mean_tokens": sum(a["tokens"] for a in rows) / n,
                          "stopped": sum(a["stopped"] for a in rows) / n,
                          "format_ok": sum(a["format_ok"] for a in rows) / n,
                          "mean_score": sum(scores) / len(scores) if scores else None}
    return {"max_new_tokens": data.get("max_new_tokens"), "score_name": data.get("score_name") or "score",
            "prompts": prompts, "stages": stages, "answers": {s: answers[s] for s in stages}, "summary": summary}
