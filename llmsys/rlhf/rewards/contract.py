"""What a reward is: a function of a batch of answered prompts, one finite score per response, or a clear error.

``reward(prompts, responses, metadata)``: ``prompts[i]`` is the last user message of the prompt that
``responses[i]`` (the decoded response, without its end-of-turn token) answers, and ``metadata[i]`` that
prompt row's extra fields (its ``answer`` and anything else the row carried,
:attr:`llmsys.data.prompts.PromptSet.train_meta`) plus what the trainer adds (``finished``). It returns a
list (or tuple, array, 1-D tensor) of ``len(responses)`` finite numbers and must not modify its arguments.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Scores = Sequence[float] | torch.Tensor
RewardFn = Callable[[Sequence[str], Sequence[str], Sequence[Mapping[str, Any]]], Scores]


class RewardError(ValueError):
    """A reward cannot score a batch: its source is unknown or not importable, it raised, it returned the wrong
    number of scores or a non-finite one, or a row lacks what a checker needs. The message names the source."""
