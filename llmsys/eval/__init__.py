"""Evaluation: stage metrics and behaviour probes.

``annotator`` holds :class:`RuleAnnotator`, the documented rule-based stand-in for human rankers that
ranks the embedded preference data and measures behaviour after alignment (mean score of answers).
``probes`` asks every checkpoint the same held-out chat prompts and measures how often it answers in
the template's format and stops at the end-of-turn token (the pipeline's stage report).
"""
from llmsys.eval.annotator import ANNOTATOR_NAME, RuleAnnotator, content_words, words

__all__ = ["ANNOTATOR_NAME", "RuleAnnotator", "content_words", "words"]
__all__ += ["format_stop_probe", "held_out_prompts", "load_export"]

_PROBES = frozenset({"format_stop_probe", "held_out_prompts", "load_export"})


def __getattr__(name: str):
    # probes imports llmsys.data, which imports the annotator from here: load it on first use.
    if name in _PROBES:
        from llmsys.eval import probes

        return getattr(probes, name)
    raise AttributeError(f"module 'llmsys.eval' has no attribute {name!r}")
