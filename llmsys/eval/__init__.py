"""Evaluation: stage metrics and behaviour probes.

``probes`` asks every checkpoint the same held-out chat prompts and measures how often it answers in
the template's format and stops at the end-of-turn token (:func:`format_and_stop_rate`, the
pipeline's stage report), and scores the answers with :class:`RuleAnnotator`, the rule-based stand-in
for human rankers that lives with the rewards in :mod:`llmsys.rlhf.rewards` (re-exported here);
``exact_answer_probe`` measures a verifiable task's held-out accuracy (greedy).

For the pipeline's report, ``side_by_side`` answers the same few held-out prompts with every stage's
export (the answers behind the rates), and ``plots`` draws the stages' curves and the probes as PNGs
(matplotlib, imported only by that module).
"""
from llmsys.eval.probes import (
    exact_answer_probe,
    format_and_stop_rate,
    format_stop_probe,
    held_out_prompts,
    load_export,
)
from llmsys.rlhf.rewards import ANNOTATOR_NAME, RuleAnnotator, content_words, words

__all__ = [
    "ANNOTATOR_NAME",
    "RuleAnnotator",
    "content_words",
    "exact_answer_probe",
    "format_and_stop_rate",
    "format_stop_probe",
    "held_out_prompts",
    "load_export",
    "words",
]
