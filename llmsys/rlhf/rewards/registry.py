"""Reward sources by name, user functions by import path, and their weighted sum.

A *source* is a string from the user's config (``grpo.rewards[*].source``):

- a registered name: the built-ins ``exact_answer``, ``format`` and ``annotator``
  (:mod:`llmsys.rlhf.rewards.verifiable`), or a name that the trainer registers at run time because it
  needs a model (``reward_model``: the learned reward model, ``registry.register("reward_model", fn)``);
- an import path ``package.module:function`` (the attribute may be dotted, ``module:Class.method``): the
  module is imported with :func:`importlib.import_module` (so it must be importable, e.g. on ``PYTHONPATH``)
  and the attribute must be callable. Only the config names code to import; nothing in the data or in a
  response is ever evaluated or executed.

:meth:`RewardRegistry.combine` turns a list of ``(source, weight)`` terms (:class:`RewardSpec`, or the
config's own entries: anything with ``.source`` and ``.weight``) into a :class:`Reward`, every source
resolved at once so that a bad one fails when the run starts. :func:`build_reward` registers and
combines in one call: ``build_reward(cfg.grpo.rewards, reward_model=fn)``, ``fn`` the trainer's wrapper
of its model (or None: not registered). Calling a :class:`Reward` scores a batch with every source and
returns a :class:`RewardScores` pair: ``total = sum_k weight_k * score_k`` and each source's unweighted
scores under its source string, which trainers log as ``reward/<source>``. A weight may be 0 (logged,
not optimised) or negative (a penalty).

Every call of a source is checked: an exception, a result that is not one number per response (wrong
length, a scalar, a 2-D tensor, text), or a non-finite score (NaN, inf, or a value beyond float32) fails
with :class:`~llmsys.rlhf.rewards.contract.RewardError` naming the source (and the response), never a
silent 0.
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import torch

from llmsys.rlhf.rewards.contract import RewardError, RewardFn
from llmsys.rlhf.rewards.verifiable import annotator_score, answer_format, exact_answer

BUILTIN_REWARDS: Mapping[str, RewardFn] = MappingProxyType({
    "exact_answer": exact_answer,
    "format": answer_format,
    "annotator": annotator_score,
})

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMPORT_PATH = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
                          r":([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


class RewardTerm(Protocol):
    """One term of a combined reward: :class:`RewardSpec`, or a config entry with the same two fields."""

    source: str
    weight: float


@dataclass(frozen=True)
class RewardSpec:
    """``weight * source(prompts, responses, metadata)``, one term of a :class:`Reward`."""

    source: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise RewardError(f"reward source {self.source!r}: expected a name or an import path module:function")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise RewardError(f"reward {self.source!r}: weight {self.weight!r} is not a finite number")


def import_reward(path: str) -> RewardFn:
    """The callable named by the import path ``module:function`` (a :class:`RewardError` saying why not)."""
    match = _IMPORT_PATH.fullmatch(path)
    if match is None:
        raise RewardError(f"reward source {path!r} is not an import path; expected package.module:function")
    module_name, attribute = match.groups()
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward source {path!r}: cannot import module {module_name!r} ({err})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RewardError(f"reward source {path!r}: {getattr(target, '__name__', module_name)!r} has no "
                              f"attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(f"reward source {path!r} is a {type(target).__name__}, not a callable "
                          f"(prompts, responses, metadata) -> scores")
    return target


class RewardRegistry:
    """Named reward sources: the built-ins, plus what a trainer registers for this run (``reward_model``)."""

    def __init__(self) -> None:
        self._sources: dict[str, RewardFn] = dict(BUILTIN_REWARDS)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._sources)

    def register(self, name: str, reward: RewardFn) -> None:
        """Add the source ``name`` (a Python identifier, not yet registered) scoring with ``reward``."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RewardError(f"reward name {name!r} is not an identifier (letters, digits, underscores)")
        if name in self._sources:
            raise RewardError(f"reward {name!r} is already registered")
        if not callable(reward):
            raise RewardError(f"reward {name!r}: {type(reward).__name__} is not callable")
        self._sources[name] = reward

    def resolve(self, source: str) -> RewardFn:
        """The function of a registered name, else of an import path ``module:function``."""
        if source in self._sources:
            return self._sources[source]
        if ":" not in source:
            raise RewardError(f"unknown reward source {source!r}; expected one of {', '.join(self._sources)} or "
                              f"an import path package.module:function (reward_model is registered by the "
                              f"trainer when it loads a reward model)")
        return import_reward(source)

    def combine(self, terms: Iterable[RewardTerm]) -> Reward:
        """The weighted sum of ``terms`` (each source at most once), every source resolved now."""
        specs = [RewardSpec(term.source, term.weight) for term in terms]
        if not specs:
            raise RewardError("no reward source given; expected at least one (source, weight)")
        seen: set[str] = set()
        for spec in specs:
            if spec.source in seen:
                raise RewardError(f"reward source {spec.source!r} is listed twice; give it one weight")
            seen.add(spec.source)
        return Reward([(spec.source, float(spec.weight), self.resolve(spec.source)) for spec in specs])


class RewardScores(NamedTuple):
    """Scores of one batch: the weighted ``total`` and each source's own scores, all float32 ``(B,)`` on the CPU
    (a pair: ``total, per_source = reward(...)``)."""

    total: torch.Tensor
    per_source: dict[str, torch.Tensor]


def checked_scores(name: str, reward: RewardFn, prompts: Sequence[str], responses: Sequence[str],
                   metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``reward``'s scores of the batch as float32 ``(B,)`` on the CPU; a :class:`RewardError` naming ``name``
    when it raises or returns anything but ``B`` finite numbers."""
    count = len(responses)
    try:
        result = reward(prompts, responses, metadata)
    except Exception as err:  # any failure of a user's function, reported under its source name
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
    if isinstance(result, (str, bytes, Mapping)) or result is None:
        raise RewardError(f"reward {name!r} returned a {type(result).__name__}; expected {count} scores, one per "
                          f"response")
    try:
        if isinstance(result, torch.Tensor):
            scores = result.detach().to("cpu", torch.float64)
        else:
            scores = torch.as_tensor(result if hasattr(result, "__array__") else list(result), dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise RewardError(f"reward {name!r} returned {type(result).__name__} that is not a list of numbers "
                          f"({err}); expected {count} scores, one per response") from None
    if scores.dim() != 1 or scores.numel() != count:
        raise RewardError(f"reward {name!r} returned shape {tuple(scores.shape)} for {count} responses; expected "
                          f"({count},), one score per response")
    single = scores.to(torch.float32)
    bad = (~torch.isfinite(single)).nonzero().flatten()
    if bad.numel():
        index = int(bad[0])
        raise RewardError(f"reward {name!r} returned a non-finite score {float(scores[index])!r} for response "
                          f"{index} of {count} (scores are float32)")
    return single


class Reward:
    """``sum_k weight_k * source_k(prompts, responses, metadata)``, with each source's scores kept (see module)."""

    def __init__(self, terms: Sequence[tuple[str, float, RewardFn]]) -> None:
        self.terms = list(terms)

    @property
    def names(self) -> tuple[str, ...]:
        """The sources, in order: the keys of :attr:`RewardScores.per_source`."""
        return tuple(name for name, _, _ in self.terms)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]]) -> RewardScores:
        if not len(prompts) == len(responses) == len(metadata):
            raise RewardError(f"expected as many prompts, responses and metadata rows, got {len(prompts)}, "
                              f"{len(responses)} and {len(metadata)}")
        for index, meta in enumerate(metadata):
            if not isinstance(meta, Mapping):
                raise RewardError(f"metadata[{index}] is a {type(meta).__name__}, expected a dict of row fields")
        per_source = {name: checked_scores(name, reward, prompts, responses, metadata)
                      for name, _, reward in self.terms}
        total = torch.zeros(len(responses), dtype=torch.float32)
        for name, weight, _ in self.terms:
            total += weight * per_source[name]
        if not bool(torch.isfinite(total).all()):
            weights = ", ".join(f"{name}={weight:g}" for name, weight, _ in self.terms)
            raise RewardError(f"the weighted reward overflows float32 (weights {weights})")
        return RewardScores(total, per_source)


def build_reward(terms: Iterable[RewardTerm], **run_sources: RewardFn | None) -> Reward:
    """The :class:`Reward` of ``terms`` over the built-ins plus ``run_sources`` (name -> reward function,
    registered for this run; a None is not registered, so ``reward_model=None`` leaves that name unknown)."""
    registry = RewardRegistry()
    for name, reward in run_sources.items():
        if reward is not None:
            registry.register(name, reward)
    return registry.combine(terms)
