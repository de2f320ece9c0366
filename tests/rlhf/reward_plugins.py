"""User reward functions for tests/rlhf/test_rewards.py, loaded by import path (``tests.rlhf.reward_plugins:NAME``)."""
from __future__ import annotations

import math

import numpy as np
import torch

NOT_CALLABLE = 3


def brevity(prompts, responses, metadata):
    """1 / (1 + number of words): prefers short answers."""
    return [1.0 / (1 + len(response.split())) for response in responses]


def as_tensor(prompts, responses, metadata):
    """The response length in characters, as a tensor."""
    return torch.tensor([float(len(response)) for response in responses])


def as_array(prompts, responses, metadata):
    """Whether the row is marked hard, as a numpy array of booleans."""
    return np.array([bool(meta.get("hard")) for meta in metadata])


class Scorer:
    @staticmethod
    def constant(prompts, responses, metadata):
        return [0.25] * len(responses)


def raises(prompts, responses, metadata):
    raise KeyError("label")


def wrong_length(prompts, responses, metadata):
    return [1.0] * (len(responses) + 1)


def nan_score(prompts, responses, metadata):
    return [0.0] * (len(responses) - 1) + [math.nan]


def scalar(prompts, responses, metadata):
    return 1.0


def matrix(prompts, responses, metadata):
    return torch.ones(len(responses), 1)


def text(prompts, responses, metadata):
    return ["good"] * len(responses)


def huge(prompts, responses, metadata):
    return [1e300] * len(responses)
