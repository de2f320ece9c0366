"""Stage 3d: critic-free online RL: GRPO and its family, with verifiable or programmable rewards.

GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO (Ahmadian et al. 2024), REINFORCE++ (Hu 2025),
DAPO (Yu et al. 2025) and GSPO (Zheng et al. 2025) are settings of one loop (see
:class:`llmsys.config.schema.GRPOConfig`), built from the parts PPO uses. The actor and the frozen
reference start from ``model.init_from`` (the SFT export); no critic. One iteration, top to bottom:

1. **generate** ``grpo.group_size`` responses for each of this rank's prompts (consecutive rows), keeping
   the decode path's log-probs of the drawn tokens; ranks decode in lock-step.
2. **score**: actor (old) and reference log-probs with the training forward; the **log-prob mismatch
   gate** compares the first with the decode path's (``logprob_diff_mean``/``max``: warn, then stop past
   ``grpo.logprob_diff_stop``); the rewards (weighted sources: exact answer, format, annotator, a reward
   model, user functions) on the decoded text, minus DAPO's over-length penalty.
3. **advantages**: group-relative (grpo, rloo) per response, or REINFORCE++'s whitened returns-to-go;
   groups whose rewards are all equal leave the loss with ``grpo.dynamic_sampling``; truncated importance
   weights (``grpo.tis_cap``) correct for the decode/training mismatch.
4. **update**: ``grpo.epochs`` passes over minibatches of ``trainer.global_batch_size`` sequences of the
   clipped surrogate (token or sequence ratio, clip-higher, the chosen aggregation) plus ``beta * k3`` to
   the reference unless the KL is in the reward.

Every ``trainer.eval_every`` iterations (and at the start and the end) the held-out prompts are answered
greedily: ``val_reward_mean``, and ``val_accuracy`` (the exact-answer rate) when the rows carry an
answer. ``metrics.jsonl`` lines carry ``reward_mean``, ``accuracy``, ``kl``, ``response_length``,
``logprob_diff_mean``, ``policy_loss``, ``clipfrac``, ``dropped_groups`` and each reward source as
``reward/<source>``. Checkpoints hold the actor; ``final/`` is an LM export like SFT's.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from llmsys.config import Config, GRPOConfig
from llmsys.data import BlockSampler, Tokenizer
from llmsys.data.prompts import PromptSet
from llmsys.distributed import DistInfo, all_reduce_max, all_reduce_sum
from llmsys.models.generation import Generation
from llmsys.rlhf.advantages import broadcast_to_tokens, group_advantages, reinforce_pp_advantages, rloo_advantages
from llmsys.rlhf.kl import kl_penalty
from llmsys.rlhf.losses import kl_loss, masked_agg, policy_loss
from llmsys.rlhf.rewards import Reward, build_reward, exact_answer
from llmsys.rlhf.rollout import (
    Rollout,
    Sampling,
    generate_rollout,
    kl_shaped_rewards,
    logprob_mismatch,
    overlong_penalty,
    policy_logprobs,
    decode_responses,
    score_at_last_token,
    score_rollout,
    truncated_is_weights,
    uniform_groups,
)
from llmsys.trainers.components import (
    STOP,
    MetricWindow,
    NumericalGuard,
    OnlineModels,
    check_finite_weights,
    equal_share,
    every_rank_finished,
    export_final,
    online_prompts,
    online_rl_models,
    reduce_sums,
    resume,
    resume_config,
    resume_path,
    stopped_early,
)
from llmsys.trainers.observe import MetricsLogger, SampleLog, write_run_config

log = logging.getLogger(__name__)


class LogprobMismatchError(RuntimeError):
    """The decode path and the training forward disagree on the sampled tokens' log-probs."""


def run(cfg: Config, dist: DistInfo) -> dict:
    gcfg, tcfg, world = cfg.grpo, cfg.trainer, dist.world_size
    out, local, mb = Path(tcfg.output_dir), gcfg.rollout_batch_size // world, tcfg.micro_batch_size
    ckpt_root = out / "checkpoints"
    if gcfg.rollout_batch_size % (world * math.lcm(gcfg.group_size, mb)):
        raise ValueError(f"grpo.rollout_batch_size={gcfg.rollout_batch_size}: each of the {world} ranks must get "
                         f"whole groups of grpo.group_size={gcfg.group_size} and whole micro-batches of "
                         f"trainer.micro_batch_size={mb}")
    tokenizer, sampling, prompts = online_prompts(cfg, dist, max_new_tokens=gcfg.max_new_tokens,
                                                  temperature=gcfg.temperature, top_p=gcfg.top_p)

    updates_per_iter = gcfg.epochs * (gcfg.rollout_batch_size // tcfg.global_batch_size)
    models = online_rl_models(cfg, dist, tokenizer.vocab_size, tcfg.max_steps * updates_per_iter,
                              reward_model=gcfg.reward_model, critic_from=None, critic_lr=0.0,
                              offload_frozen=gcfg.offload_frozen, max_new_tokens=gcfg.max_new_tokens)
    model_reward = ModelReward(models.reward_model, mb) if models.reward_model is not None else None
    reward = build_reward(gcfg.rewards, reward_model=model_reward)
    start = 0
    resume_from = resume_path(tcfg.resume, ckpt_root)
    if resume_from is not None:
        start = resume(models.actor, resume_from, cfg, unit="iteration")["step"]
    if dist.is_main:
        write_run_config(out, cfg, {"deepspeed_config.json": json.dumps(models.actor.config, indent=2) + "\n"})
    samples = SampleLog(out, enabled=dist.is_main and gcfg.log_samples > 0, start_step=start)
    logger = MetricsLogger(out, cfg.logger, enabled=dist.is_main, total_steps=tcfg.max_steps, start_step=start,
                           run_config=dataclasses.asdict(cfg))
    log.info("grpo (%s): %d train / %d held-out prompts, %d x %d responses per iteration over %d ranks, "
             "%d updates per iteration", gcfg.advantage, len(prompts.train), len(prompts.val),
             gcfg.rollout_batch_size // gcfg.group_size, gcfg.group_size, world, updates_per_iter)

    sampler = BlockSampler(len(prompts.train), tcfg.seed)
    per_iter, local_prompts = gcfg.rollout_batch_size // gcfg.group_size, local // gcfg.group_size
    evaluate = tcfg.eval_every and prompts.val
    if evaluate and start == 0:
        logger.log({"step": 0, **held_out(models, prompts, reward, model_reward, tokenizer, sampling, cfg, dist)})
    guard = NumericalGuard(tcfg.max_bad_steps, ckpt_root)
    started = time.perf_counter()
    with STOP.deferred():  # a stop signal ends the run after its iteration, with a checkpoint
        for it in range(start, tcfg.max_steps):
            # 1. generate: group_size responses per prompt -------------------------------------------
            indices = next(iter(sampler.micro_batches(it, per_iter, local_prompts, dist.rank, world)))
            rows = [i for i in indices for _ in range(gcfg.group_size)]
            t0 = time.perf_counter()
            generator = torch.Generator(device=dist.device).manual_seed(tcfg.seed * 1_000_003 + it * 1009 + dist.rank)
            gen, rollout = generate_rollout(models.actor, [prompts.train[i] for i in rows], sampling, generator,
                                            all_finished=every_rank_finished if world > 1 else None,
                                            record_logprobs=True)
            generation_time, t0 = time.perf_counter() - t0, time.perf_counter()

            # 2. score: log-probs, the mismatch gate, rewards ----------------------------------------
            score_rollout(rollout, policy=models.actor, reference=models.reference if gcfg.kl_coef else None,
                          reward_model=None, critic=None, micro_batch=mb, temperature=sampling.logprob_temperature)
            mismatch = logprob_mismatch(rollout, all_reduce_sum, all_reduce_max)
            check_mismatch(mismatch, gcfg, it + 1, rollout, tokenizer)
            texts = decode_responses(tokenizer, gen)
            prompt_texts = [prompts.train_texts[i] for i in rows]
            meta = [{**prompts.train_meta[i], "finished": bool(f)} for i, f in zip(rows, gen.finished.tolist())]
            if model_reward is not None:
                model_reward.rollout = rollout
            scores, by_source = reward(prompt_texts, texts, meta)
            rollout.scores = scores.to(dist.device) - overlong_penalty(
                gen.lengths, gcfg.max_new_tokens, gcfg.overlong_buffer, gcfg.overlong_penalty)

            # 3. advantages --------------------------------------------------------------------------
            dropped = advantages(rollout, gen, gcfg)
            score_time, t0 = time.perf_counter() - t0, time.perf_counter()

            # 4. update ------------------------------------------------------------------------------
            skipped_before = models.actor.skipped_steps
            updated = grpo_update(models, rollout, gcfg, iteration=it, seed=tcfg.seed,
                                  minibatch=tcfg.global_batch_size // world, micro_batch=mb, dist=dist,
                                  temperature=sampling.logprob_temperature)
            train_time = time.perf_counter() - t0
            # An iteration any of whose updates was skipped as non-finite counts as one bad step.
            guard.observe(it + 1, skipped=models.actor.skipped_steps > skipped_before, loss=updated.get("policy_loss"),
                          grad_norm=None)

            # 5. observe -----------------------------------------------------------------------------
            correct = None  # the exact-answer rate, from the reward's own check when it has one
            if "exact_answer" in by_source:
                correct = by_source["exact_answer"].double()
            elif all("answer" in m for m in meta):
                correct = torch.tensor(exact_answer(prompt_texts, texts, meta), dtype=torch.float64)
            row = {"step": it + 1, **rollout_stats(rollout, gen, by_source, correct, dropped, gcfg.group_size),
                   **mismatch, **updated, **guard.metrics(), "lr": models.actor.lr, "generation_time": generation_time,
                   "score_time": score_time, "train_time": train_time, "elapsed": time.perf_counter() - started}
            logger.log(row)
            logger.advance(it + 1, {"reward": row["reward_mean"], "acc": row.get("accuracy"), "kl": row["kl"]})
            samples.write([{"step": it + 1, "prompt": prompt_texts[b], "response": texts[b],
                            "response_ids": gen.tokens[b, :int(gen.lengths[b])].tolist(), "finished": bool(gen.finished[b]),
                            "reward": float(rollout.scores[b]), **prompts.train_meta[rows[b]]}
                           for b in range(0, min(gcfg.log_samples * gcfg.group_size, local), gcfg.group_size)])

            # 6. evaluate, checkpoint ----------------------------------------------------------------
            done = it + 1
            if evaluate and (done % tcfg.eval_every == 0 or done == tcfg.max_steps):
                logger.log({"step": done, **held_out(models, prompts, reward, model_reward, tokenizer, sampling, cfg, dist)})
            stop = STOP.poll(dist)
            if guard.healthy and ((tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.max_steps or stop):
                check_finite_weights(models.actor, f"the checkpoint of iteration {done}", ckpt_root)
                models.actor.save_checkpoint(ckpt_root, done, {"config": resume_config(cfg)}, keep=tcfg.keep_checkpoints)
            if stop:
                return stopped_early(stop, done, ckpt_root, logger, dist)

    export_final(models.actor, models.actor_cfg, out / "final", out / "tokenizer", dist,
                 extra={"stage": "grpo", "step": tcfg.max_steps, "precision": tcfg.precision,
                        "advantage": gcfg.advantage})
    logger.close()
    summary = {"output_dir": str(out), "iterations": tcfg.max_steps, "seconds": time.perf_counter() - started}
    if dist.is_main:
        log.info("done: %s", json.dumps(summary))
    return summary


class ModelReward:
    """The learned reward model as a reward source (``reward_model``): it scores the token ids of the rollout
    being rewarded (set :attr:`rollout` first), at each response's last token, micro-batch by micro-batch."""

    def __init__(self, model, micro_batch: int) -> None:
        self.model, self.micro_batch, self.rollout = model, micro_batch, None

    def __call__(self, prompts, responses, metadata) -> torch.Tensor:
        rows = len(self.rollout)
        return torch.cat([self.model(part.input_ids, last_index=part.last_index).float().cpu()
                          for part in (self.rollout.select(torch.arange(s, min(s + self.micro_batch, rows),
                                                                        device=self.rollout.input_ids.device))
                                       for s in range(0, rows, self.micro_batch))])


def check_mismatch(mismatch: dict[str, float], gcfg: GRPOConfig, step: int, rollout: Rollout,
                   tokenizer: Tokenizer) -> None:
    """Warn past ``grpo.logprob_diff_warn``; past ``grpo.logprob_diff_stop`` stop with where it is worst."""
    mean = mismatch["logprob_diff_mean"]
    if gcfg.logprob_diff_stop and mean > gcfg.logprob_diff_stop:
        diff = (rollout.sampler_logprobs - rollout.logprobs).abs() * rollout.mask
        b, r = divmod(int(diff.argmax()), diff.shape[1])
        token = int(rollout.labels.gather(1, rollout.positions)[b, r])
        raise LogprobMismatchError(
            f"iteration {step}: the decode path's log-probs of the sampled tokens differ from the training "
            f"forward's by {mean:.4g} on average (max {mismatch['logprob_diff_max']:.4g}; "
            f"grpo.logprob_diff_stop={gcfg.logprob_diff_stop}). Worst on this rank: row {b}, response token {r} "
            f"({tokenizer.id_to_token(token)!r}): decode {float(rollout.sampler_logprobs[b, r]):.4f}, training "
            f"{float(rollout.logprobs[b, r]):.4f}. The update would be off-policy: use the same precision and "
            f"kernels for both (model.decode_attention, trainer.precision), or grpo.tis_cap to correct it")
    if mean > gcfg.logprob_diff_warn:
        log.warning("iteration %d: decode vs training log-prob difference %.4g (max %.4g) exceeds "
                    "grpo.logprob_diff_warn=%g", step, mean, mismatch["logprob_diff_max"], gcfg.logprob_diff_warn)


def advantages(rollout: Rollout, gen: Generation, gcfg: GRPOConfig) -> torch.Tensor:
    """Fill ``rollout.advantages`` (B, R) and, with dynamic sampling, take the groups whose rewards are all
    equal out of ``rollout.mask``; returns those rows (B,) bool."""
    scores, mask = rollout.scores, rollout.mask
    if gcfg.kl_coef and gcfg.kl_in_reward and gcfg.advantage != "reinforce_pp":
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, gcfg.kl_estimator) * mask
        scores = scores - gcfg.kl_coef * kl.sum(-1)  # the sequence's KL taken off its score
    if gcfg.advantage == "reinforce_pp":
        if gcfg.kl_coef and gcfg.kl_in_reward:
            token_rewards = kl_shaped_rewards(scores, rollout, gen.lengths, gcfg.kl_coef, gcfg.kl_estimator)
        else:
            token_rewards = score_at_last_token(scores, rollout, gen.lengths)
        rollout.advantages = reinforce_pp_advantages(token_rewards, mask, gamma=gcfg.gamma, reduce=all_reduce_sum)
    else:
        per_response = (group_advantages(scores, gcfg.group_size, normalize_std=gcfg.normalize_std)
                        if gcfg.advantage == "grpo" else rloo_advantages(scores, gcfg.group_size))
        rollout.advantages = broadcast_to_tokens(per_response, mask)
    dropped = torch.zeros_like(rollout.finished)
    if gcfg.dynamic_sampling and gcfg.group_size > 1:
        dropped = uniform_groups(rollout.scores, gcfg.group_size)
        rollout.mask = mask * (~dropped).float()[:, None]
    if gcfg.tis_cap:
        rollout.advantages = rollout.advantages * truncated_is_weights(rollout, gcfg.tis_cap)
    return dropped


def grpo_update(models: OnlineModels, rollout: Rollout, gcfg: GRPOConfig, *, iteration: int, seed: int,
                minibatch: int, micro_batch: int, dist: DistInfo, temperature: float) -> dict[str, float]:
    """``grpo.epochs`` shuffled passes over this rank's rows, ``minibatch`` rows per optimizer step: the clipped
    surrogate (``llmsys.rlhf.losses.policy_loss``) plus ``kl_coef * k3`` unless the KL is in the reward."""
    actor, window = models.actor, MetricWindow(dist.device)
    kl_term = gcfg.kl_coef and not gcfg.kl_in_reward
    for epoch in range(gcfg.epochs):
        order_rng = torch.Generator().manual_seed(seed * 7919 + iteration * 131 + epoch * 17 + dist.rank)
        order = torch.randperm(len(rollout), generator=order_rng).to(dist.device)
        for m in range(0, len(rollout), minibatch):
            for s in range(m, m + minibatch, micro_batch):
                part = rollout.select(order[s:s + micro_batch])
                logp, entropy = policy_logprobs(actor, part, temperature)
                loss, clipfrac = policy_loss(logp, part.logprobs, part.advantages, part.mask,
                                             clip_low=gcfg.clip_low, clip_high=gcfg.clip_high, agg=gcfg.loss_agg,
                                             level=gcfg.ratio_level, max_len=gcfg.max_new_tokens)
                metrics = {"clipfrac": clipfrac, "entropy": masked_agg(entropy.detach(), part.mask, "token-mean")}
                if kl_term:
                    kl = kl_loss(logp, part.ref_logprobs, part.mask, estimator="k3", agg=gcfg.loss_agg,
                                 max_len=gcfg.max_new_tokens)
                    metrics["kl_loss"] = kl.detach()
                    loss = loss + gcfg.kl_coef * kl
                actor.backward(loss)
                actor.step()
                window.add(loss, metrics)
    updated = window.mean()
    return {"policy_loss": updated.pop("loss"), **updated}


def rollout_stats(rollout: Rollout, gen: Generation, by_source: dict[str, torch.Tensor],
                  correct, dropped: torch.Tensor, group_size: int) -> dict[str, float]:
    """Collective. This iteration's means over every rank: reward (and each source), the exact-answer rate,
    KL to the reference, response length, finished rate, and the groups left out."""
    device = rollout.mask.device
    values = {"reward": rollout.scores.double().sum(), "length": gen.lengths.double().sum(),
              "finished": gen.finished.double().sum(), "dropped": dropped.double().sum() / group_size,
              "rows": torch.tensor(float(len(rollout)), dtype=torch.float64, device=device)}
    values["kl"] = (((rollout.logprobs - rollout.ref_logprobs) * rollout.mask).sum() if rollout.ref_logprobs is not None
                    else torch.zeros((), device=device))
    values.update({f"reward/{name}": part.double().sum() for name, part in by_source.items()})
    if correct is not None:
        values["correct"] = correct.sum()
    sums = reduce_sums(values)
    n = sums.pop("rows")
    row = {"reward_mean": sums["reward"] / n, "kl": sums["kl"] / n, "response_length": sums["length"] / n,
           "finished_rate": sums["finished"] / n, "dropped_groups": sums["dropped"]}
    if correct is not None:
        row["accuracy"] = sums["correct"] / n
    row.update({name: value / n for name, value in sums.items() if name.startswith("reward/")})
    return row


def held_out(models: OnlineModels, prompts: PromptSet, reward: Reward, model_reward, tokenizer: Tokenizer,
             sampling: Sampling, cfg: Config, dist: DistInfo) -> dict[str, float]:
    """Collective. Greedy answers to the held-out prompts (the first ``trainer.eval_samples``, each counted on
    one rank): their mean reward and, when the rows carry answers, the exact-answer rate."""
    n = min(cfg.trainer.eval_samples or len(prompts.val), len(prompts.val))
    share, n_real = equal_share(list(range(n)), dist, every_item=True)
    greedy = dataclasses.replace(sampling, temperature=0.0)
    gen, rollout = generate_rollout(models.actor, [prompts.val[i] for i in share], greedy, torch.Generator(),
                                    all_finished=every_rank_finished if dist.world_size > 1 else None)
    texts = decode_responses(tokenizer, gen)
    meta = [{**prompts.val_meta[i], "finished": bool(f)} for i, f in zip(share, gen.finished.tolist())]
    prompt_texts = [prompts.val_texts[i] for i in share]
    if model_reward is not None:
        model_reward.rollout = rollout
    scores, _ = reward(prompt_texts, texts, meta)  # every row, so a reward model runs as often on every rank
    real = slice(0, n_real)
    values = {"reward": scores[real].double().sum(), "n": torch.tensor(float(n_real), dtype=torch.float64),
              "length": gen.lengths[real].double().sum().cpu()}
    has_answers = all("answer" in m for m in prompts.val_meta[:n])
    if has_answers:
        values["correct"] = torch.tensor(sum(exact_answer(prompt_texts[real], texts[real], meta[real])),
                                         dtype=torch.float64)
    sums = reduce_sums({k: v.to(dist.device) for k, v in values.items()})
    result = {"val_reward_mean": sums["reward"] / sums["n"], "val_response_length": sums["length"] / sums["n"]}
    if has_answers:
        result["val_accuracy"] = sums["correct"] / sums["n"]
    return result
