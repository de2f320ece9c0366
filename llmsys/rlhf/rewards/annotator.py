"""The rule-based annotator: text rules that score an answer, with no model.

:class:`RuleAnnotator` is the documented stand-in for human rankers. No human preference set ships
in any package registry, so the embedded alignment default (``data=prefs``) is ranked by this
annotator, and the same rules measure how DPO and PPO changed the policy's behaviour (the mean score
of the answers it generates). A human-ranking tool will later write the same ``{"prompt",
"responses", "ranking"}`` rows; nothing downstream knows which produced them.

The score of a response is a sum of simple, explainable terms (the weights are the class
attributes below; :meth:`RuleAnnotator.breakdown` returns each term):

=================  ===============================================================================
term               rule
=================  ===============================================================================
``length``         concise: ``-0.1`` per word beyond ``TARGET_WORDS = 12``
``empty``          ``-3.0`` when the response has no word at all
``unfinished``     ``-1.0`` when generation did not end with the end-of-turn token (``finished=False``)
``punctuation``    ``-0.5`` when the text stops mid-sentence: its last character is not one of
                   ``. ! ? … ) ] } " ' ” ’`` or a backtick
``repetition``     ``-2.0 * (1 - distinct / total)`` over the words of 3+ characters (short function
                   words repeat in any sentence): loops like "fine fine fine" cost
``on_topic``       ``+0.5 * (share of the prompt's content words that the response uses)``
``polite``         ``+0.5`` when a polite word appears (please, thanks, thank, sorry, glad, welcome,
                   kindly, appreciate)
``rude``           ``-1.0`` when a rude word appears (stupid, idiot, dumb, moron, shut, whatever, ugh, duh)
``junk``           ``-1.0`` when template text leaks into the answer (``<|im_start|>``, ``<|im_end|>``,
                   ``<|endoftext|>``, ``<|pad|>``, ``</s>``, or a line starting with a role name
                   followed by a colon or a newline, like ``assistant:``)
=================  ===============================================================================

Words are the lowercase runs of letters and digits (with an inner apostrophe: "don't" is one
word); content words are words of three or more characters that are not in a short stop-word
list. The total is rounded to 6 decimals so that equal scores compare equal, and :meth:`rank`
breaks ties by the original index, so the same input always yields the same ranking. Any text is
accepted (empty, code, other scripts); nothing raises on content.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

ANNOTATOR_NAME = "rule-v1"

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
_FINAL_CHARS = frozenset(".!?…)]}\"'”’`")
_JUNK_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>", "</s>")
_ROLE_LINE = re.compile(r"(?im)^\s*(?:system|user|assistant)\s*(?::|$)")

# Only words of 3+ characters matter (shorter ones are never content words).
STOP_WORDS = frozenset([
    "the", "and", "for", "are", "but", "not", "you", "your", "yours", "all", "any", "can", "had", "her",
    "was", "one", "our", "out", "has", "him", "his", "how", "its", "who", "what", "when", "where",
    "which", "why", "will", "with", "would", "could", "should", "this", "that", "these", "those",
    "there", "their", "they", "them", "then", "than", "from", "have", "been", "being", "into", "onto",
    "about", "over", "under", "some", "such", "very", "just", "also", "does", "did", "doing", "done",
    "yes", "more", "most", "much", "many", "only", "own", "same", "too", "get", "got", "let", "lets",
    "i'm", "you're", "it's", "don't", "can't", "isn't", "aren't", "what's", "that's", "there's", "she"
])
POLITE_WORDS = frozenset(["please", "thanks", "thank", "sorry", "glad", "welcome", "kindly", "appreciate"])
RUDE_WORDS = frozenset(["stupid", "idiot", "idiotic", "dumb", "shut", "whatever", "ugh", "duh", "moron"])


def words(text: str) -> list[str]:
    """The lowercase words of ``text`` (curly apostrophes folded to ``'``)."""
    return _WORD.findall(text.lower().replace("’", "'"))


def content_words(text: str) -> set[str]:
    """Words of 3+ characters that are not stop words: what "on topic" compares."""
    return {word for word in words(text) if len(word) >= 3 and word not in STOP_WORDS}


class RuleAnnotator:
    """Scores and ranks answers by the rules of the module docstring (deterministic, no state)."""

    name = ANNOTATOR_NAME

    TARGET_WORDS = 12
    LENGTH_PENALTY = 0.1
    EMPTY_PENALTY = 3.0
    UNFINISHED_PENALTY = 1.0
    PUNCTUATION_PENALTY = 0.5
    REPETITION_WEIGHT = 2.0
    ON_TOPIC_BONUS = 0.5
    POLITE_BONUS = 0.5
    RUDE_PENALTY = 1.0
    JUNK_PENALTY = 1.0

    def breakdown(self, prompt: str, response: str, finished: bool = True) -> dict[str, float]:
        """Each term of the score (0.0 where a rule does not apply); their sum is :meth:`score`."""
        tokens = words(response)
        distinct = set(tokens)
        long_words = [word for word in tokens if len(word) >= 3]
        stripped = response.rstrip()
        prompt_content = content_words(prompt)
        terms = {
            "length": -self.LENGTH_PENALTY * max(0, len(tokens) - self.TARGET_WORDS),
            "empty": -self.EMPTY_PENALTY if not tokens else 0.0,
            "unfinished": 0.0 if finished else -self.UNFINISHED_PENALTY,
            "punctuation": 0.0 if stripped and stripped[-1] in _FINAL_CHARS else -self.PUNCTUATION_PENALTY,
            "repetition": (-self.REPETITION_WEIGHT * (1.0 - len(set(long_words)) / len(long_words))
                           if long_words else 0.0),
            "on_topic": (self.ON_TOPIC_BONUS * len(prompt_content & distinct) / len(prompt_content)
                         if prompt_content else 0.0),
            "polite": self.POLITE_BONUS if distinct & POLITE_WORDS else 0.0,
            "rude": -self.RUDE_PENALTY if distinct & RUDE_WORDS else 0.0,
            "junk": (-self.JUNK_PENALTY if any(token in response for token in _JUNK_TOKENS)
                     or _ROLE_LINE.search(response) else 0.0),
        }
        return {key: value + 0.0 for key, value in terms.items()}  # + 0.0 turns -0.0 into 0.0

    def score(self, prompt: str, response: str, finished: bool = True) -> float:
        """The annotator's score of ``response`` to ``prompt`` (higher is better), rounded to 6 decimals."""
        return round(sum(self.breakdown(prompt, response, finished).values()), 6)

    def rank(self, prompt: str, responses: Sequence[str],
             finished: Sequence[bool] | None = None) -> list[int]:
        """Indices of ``responses`` best first (a permutation); equal scores keep their input order."""
        if finished is not None and len(finished) != len(responses):
            raise ValueError(f"finished has {len(finished)} flags for {len(responses)} responses")
        scores = [self.score(prompt, response, True if finished is None else bool(finished[i]))
                  for i, response in enumerate(responses)]
        return sorted(range(len(responses)), key=lambda i: (-scores[i], i))

    def mean_score(self, prompts: Sequence[str], responses: Sequence[str],
                   finished: Sequence[bool] | None = None) -> float:
        """Mean score over ``(prompt, response)`` pairs: the behaviour metric after DPO/PPO."""
        if len(prompts) != len(responses) or not responses:
            raise ValueError(f"expected as many prompts as responses (at least one), got "
                             f"{len(prompts)} and {len(responses)}")
        if finished is not None and len(finished) != len(responses):
            raise ValueError(f"finished has {len(finished)} flags for {len(responses)} responses")
        total = sum(self.score(p, r, True if finished is None else bool(finished[i]))
                    for i, (p, r) in enumerate(zip(prompts, responses)))
        return total / len(responses)
