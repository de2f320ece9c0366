"""Rewards without a learned model, as plug-ins: rule-based and verifiable scores of answers, and their weighted sum.

- :mod:`~llmsys.rlhf.rewards.contract`: what a reward function is (``(prompts, responses, metadata) ->
  scores``) and :class:`RewardError`;
- :mod:`~llmsys.rlhf.rewards.annotator`: :class:`RuleAnnotator`, the rule-based stand-in for human rankers
  that ranks ``data=prefs`` and measures the alignment stages;
- :mod:`~llmsys.rlhf.rewards.verifiable`: checks against a row's known answer (``exact_answer``, ``format``)
  and the annotator as a reward source (``annotator``);
- :mod:`~llmsys.rlhf.rewards.registry`: sources by name or by import path ``module:function``, the names a
  trainer registers at run time (``reward_model``), and :class:`Reward`, the weighted sum that keeps each
  source's scores for logging (:func:`build_reward`).

The learned reward model is not here: it needs a model, so the trainer wraps it as a reward function and
registers it (``build_reward(cfg.grpo.rewards, reward_model=fn)``, or
``RewardRegistry().register("reward_model", fn)``).
"""
from llmsys.rlhf.rewards.annotator import (
    ANNOTATOR_NAME,
    POLITE_WORDS,
    RUDE_WORDS,
    STOP_WORDS,
    RuleAnnotator,
    content_words,
    words,
)
from llmsys.rlhf.rewards.contract import RewardError, RewardFn
from llmsys.rlhf.rewards.registry import (
    BUILTIN_REWARDS,
    Reward,
    RewardRegistry,
    RewardScores,
    RewardSpec,
    build_reward,
    checked_scores,
    import_reward,
)
from llmsys.rlhf.rewards.verifiable import (
    FORMAT_MAX_WORDS,
    annotator_score,
    answer_format,
    exact_answer,
    final_number,
    is_well_formed,
    parse_answer,
)

__all__ = [
    "ANNOTATOR_NAME",
    "BUILTIN_REWARDS",
    "FORMAT_MAX_WORDS",
    "POLITE_WORDS",
    "RUDE_WORDS",
    "STOP_WORDS",
    "Reward",
    "RewardError",
    "RewardFn",
    "RewardRegistry",
    "RewardScores",
    "RewardSpec",
    "RuleAnnotator",
    "annotator_score",
    "answer_format",
    "build_reward",
    "checked_scores",
    "content_words",
    "exact_answer",
    "final_number",
    "import_reward",
    "is_well_formed",
    "parse_answer",
    "words",
]
