"""Verifiable rewards: checks of a response against its prompt row's known answer, and the rule-based annotator
as a reward source. No model, no execution of anything the data or the policy wrote.

Each is a reward function (:data:`~llmsys.rlhf.rewards.contract.RewardFn`): ``(prompts, responses, metadata) ->
list[float]``, one score per response, where ``metadata[i]`` holds the extra fields of the prompt row that
``responses[i]`` answers (``{"answer": "68", ...}``, :attr:`llmsys.data.prompts.PromptSet.train_meta`) and
``prompts[i]`` is that prompt's last user message. A row they cannot judge (no ``answer``, an answer that is
not a number, no ``finished`` flag for the annotator) raises :class:`RewardError`: it is never scored 0.

**The final number of a response** (:func:`final_number`) is the last number in its text, where a number is

- an optional minus sign (``-`` or ``−``) that counts only when no digit comes right before it, so in
  ``"7-3"`` it is the operator and the last number is ``3``, while ``"-3"`` and ``"x=-3"`` end with ``-3``;
- then digits: a plain run (``1234``) or groups of three after a comma (``1,234`` is 1234; ``12,34`` is two
  numbers, 12 and 34);
- then optionally a decimal point and digits (``42.0``; in ``"42."`` the period ends the sentence).

Spaces around a number do not matter; a space inside one splits it (``"1 234"`` ends with 234). There are no
exponents (``1e3`` is 1 and 3) and a number starts with a digit (``.5`` reads as 5). Values compare exactly
as decimals, so ``"42"``, ``"42.0"`` and ``"42.00"`` are equal and ``0.1 + 0.2`` rounding never enters.

=================  ============================================================================================
source             score
=================  ============================================================================================
``exact_answer``   1.0 when the final number of the response equals ``metadata["answer"]`` (a number, or a
                   text that is one number in the syntax above: ``"68"``, ``"-7"``, ``"1,234"``, ``"2.5"``),
                   else 0.0 (also when the response has no number)
``format``         1.0 when the response is a short final answer: after stripping whitespace it is at most
                   ``FORMAT_MAX_WORDS = 8`` words (runs of non-space characters), contains a number, and
                   nothing follows its final number but an optional period (``"68"``, ``"The answer is
                   68."``, ``"23 + 45 = 68"``); else 0.0 (``""``, ``"68 apples"``, ``"68!"``, a rambling text)
``annotator``      :class:`~llmsys.rlhf.rewards.RuleAnnotator`'s score of ``(prompt, response, finished)``;
                   ``metadata["finished"]`` (a bool: did the generation end with the end-of-turn token) is
                   required, and the online trainers add it to each response's metadata
=================  ============================================================================================

Neither ``exact_answer`` nor ``format`` looks at ``finished``: they judge the text, and a cut-off response is
the trainer's to penalise (its missing-EOS or over-length terms).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from llmsys.rlhf.rewards.annotator import RuleAnnotator
from llmsys.rlhf.rewards.contract import RewardError

FORMAT_MAX_WORDS = 8
FINISHED_FIELD = "finished"
ANSWER_FIELD = "answer"

# (?<!\d): a sign (or a number) right after a digit does not start one ("7-3" -> 3; "1234" is one number).
# Grouped digits must end the run ((?!\d)): "1,2345" is 1 and 2345, not 1,234 and 5.
_NUMBER = re.compile(r"(?<!\d)([-\u2212]?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?")

_ANNOTATOR = RuleAnnotator()  # stateless


def _value(match: re.Match) -> Decimal:
    sign, digits, fraction = match.groups()
    return Decimal(("-" if sign else "") + digits.replace(",", "") + (f".{fraction}" if fraction else ""))


def final_number(text: str) -> Decimal | None:
    """The last number of ``text`` (module docstring), None when it has none."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else _value(last)


def parse_answer(answer: Any) -> Decimal:
    """A row's reference answer as a decimal: an int, a finite float, or a text that is exactly one number."""
    if isinstance(answer, bool):
        raise RewardError(f"answer {answer!r} is a boolean, expected a number")
    if isinstance(answer, int):
        return Decimal(answer)
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise RewardError(f"answer {answer!r} is not a finite number")
        return Decimal(repr(answer))
    if isinstance(answer, str):
        match = _NUMBER.fullmatch(answer.strip())
        if match is None:
            raise RewardError(f"answer {answer!r} is not one number (digits, an optional sign, thousands commas "
                              f"and decimals)")
        return _value(match)
    raise RewardError(f"answer {answer!r} is a {type(answer).__name__}, expected a number or its text")


def _field(metadata: Mapping[str, Any], index: int, name: str, why: str) -> Any:
    if name not in metadata:
        present = ", ".join(repr(key) for key in metadata) or "none"
        raise RewardError(f"metadata[{index}] has no {name!r} field ({why}); fields present: {present}")
    return metadata[name]


def exact_answer(prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping[str, Any]]
                 ) -> list[float]:
    """1.0 where the final number of the response equals the row's ``answer`` (as decimals), else 0.0."""
    scores = []
    for index, (response, meta) in enumerate(zip(responses, metadata, strict=True)):
        raw = _field(meta, index, ANSWER_FIELD, "exact_answer compares the response with it")
        try:
            expected = parse_answer(raw)
        except RewardError as err:
            raise RewardError(f"metadata[{index}]: {err}") from None
        got = final_number(response)
        scores.append(1.0 if got is not None and got == expected else 0.0)
    return scores


def is_well_formed(response: str) -> bool:
    """A short final answer: at most FORMAT_MAX_WORDS words, ending with its final number (and at most a period)."""
    text = response.strip()
    if len(text.split()) > FORMAT_MAX_WORDS:
        return False
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return last is not None and text[last.end():] in ("", ".")


def answer_format(prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping[str, Any]]
                  ) -> list[float]:
    """1.0 where the response is a short final answer (:func:`is_well_formed`), else 0.0 (the ``format`` source)."""
    return [1.0 if is_well_formed(response) else 0.0 for response in responses]


def annotator_score(prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[Mapping[str, Any]]
                    ) -> list[float]:
    """:class:`RuleAnnotator`'s score of each response; ``metadata[i]["finished"]`` (a bool) is required."""
    scores = []
    for index, (prompt, response, meta) in enumerate(zip(prompts, responses, metadata, strict=True)):
        finished = _field(meta, index, FINISHED_FIELD, "the annotator penalises an unfinished generation; the "
                          "trainer adds whether it ended with the end-of-turn token")
        if not isinstance(finished, bool):
            raise RewardError(f"metadata[{index}][{FINISHED_FIELD!r}] is {finished!r}, expected true or false")
        scores.append(_ANNOTATOR.score(prompt, response, finished))
    return scores
