"""Stage 3c: PPO against a learned reward model (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017).

Four models (:func:`llmsys.trainers.components.online_rl_models`): the **actor** (trained, from
``model.init_from`` = the SFT export), the **critic** (trained, a scalar-head model from
``ppo.critic_from`` or the reward model), the frozen **reference** (the SFT export again) and the
frozen **reward model** (``ppo.reward_model``). One iteration, top to bottom, on the parts of
:mod:`llmsys.rlhf.rollout`:

1. **generate** responses for this rank's share of ``ppo.rollout_batch_size`` prompts (KV cache,
   temperature, top-p, stop at the chat template's end-of-turn token). Under ZeRO-3 ranks decode in
   lock-step until every rank is done. Timed separately (``generation_time``).
2. **score**: actor and reference log-probs, critic values, reward-model scores; the scores shaped
   (missing-EOS penalty, running normalisation, clipping) and turned into per-token rewards
   ``-beta * KL_t`` plus the score at the last token; beta fixed or adaptive.
3. **advantages**: GAE (gamma, lambda), whitened over all ranks; returns = advantages + values.
4. **update**: ``ppo.ppo_epochs`` passes over minibatches of ``trainer.global_batch_size`` sequences:
   clipped policy loss minus the entropy bonus for the actor, clipped value loss for the critic.

``trainer.max_steps`` counts iterations. Checkpoints hold both engines (``checkpoints/actor``,
``checkpoints/critic``, the critic written last and read first on resume) plus the KL controller and
reward statistics; ``final/`` is the actor, an LM export like SFT's. ``metrics.jsonl`` lines carry
``reward_mean``, ``kl``, ``response_length``, ``policy_loss``, ``value_loss``, ``entropy``,
``clipfrac``, ``generation_time`` (and more); ``samples.jsonl`` holds a few decoded responses per
iteration with their scores, to watch for reward hacking.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch

from llmsys.config import Config, PPOConfig
from llmsys.data import BlockSampler
from llmsys.distributed import DistInfo, all_reduce_sum
from llmsys.rlhf.kl import AdaptiveKLController, FixedKLController
from llmsys.rlhf.losses import masked_mean, ppo_policy_loss, ppo_value_loss
from llmsys.rlhf.rewards import RuleAnnotator
from llmsys.rlhf.rollout import (
    Rollout,
    ScoreShaping,
    critic_values,
    decode_responses,
    generate_rollout,
    policy_logprobs,
    ppo_experience,
    score_rollout,
)
from llmsys.rlhf.stats import RunningMoments
from llmsys.trainers.components import (
    STOP,
    MetricWindow,
    NumericalGuard,
    OnlineModels,
    check_finite_weights,
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


def run(cfg: Config, dist: DistInfo) -> dict:
    pcfg, tcfg, world = cfg.ppo, cfg.trainer, dist.world_size
    out, local, mb = Path(tcfg.output_dir), pcfg.rollout_batch_size // world, tcfg.micro_batch_size
    ckpt_root = out / "checkpoints"
    if pcfg.rollout_batch_size % (mb * world):
        raise ValueError(f"ppo.rollout_batch_size={pcfg.rollout_batch_size} must be a multiple of "
                         f"trainer.micro_batch_size * world_size = {mb * world}")
    tokenizer, sampling, prompts = online_prompts(cfg, dist, max_new_tokens=pcfg.max_new_tokens,
                                                  temperature=pcfg.temperature, top_p=pcfg.top_p)

    updates_per_iter = pcfg.ppo_epochs * (pcfg.rollout_batch_size // tcfg.global_batch_size)
    models = online_rl_models(cfg, dist, tokenizer.vocab_size, tcfg.max_steps * updates_per_iter,
                              reward_model=pcfg.reward_model, critic_from=pcfg.critic_from or pcfg.reward_model,
                              critic_lr=pcfg.critic_lr, offload_frozen=pcfg.offload_frozen,
                              max_new_tokens=pcfg.max_new_tokens)
    actor, critic = models.actor, models.critic
    kl_ctl = (AdaptiveKLController(pcfg.init_kl_coef, pcfg.kl_target, pcfg.kl_horizon) if pcfg.adaptive_kl
              else FixedKLController(pcfg.init_kl_coef))
    moments = RunningMoments(all_reduce_sum)
    start = 0
    resume_from = resume_path(tcfg.resume, ckpt_root / "critic")
    if resume_from is not None:
        state = resume(critic, resume_from, cfg, report=False)
        resume(actor, ckpt_root / "actor" / resume_from.name, cfg, unit="iteration")
        kl_ctl.load_state_dict(state["kl_controller"])
        moments.load_state_dict(state["reward_moments"])
        start = state["step"]
    if dist.is_main:
        write_run_config(out, cfg, {"deepspeed_config.json": json.dumps(actor.config, indent=2) + "\n"})
    samples = SampleLog(out, enabled=dist.is_main and pcfg.log_samples > 0, start_step=start)
    logger = MetricsLogger(out, cfg.logger, enabled=dist.is_main, total_steps=tcfg.max_steps, start_step=start,
                           run_config=dataclasses.asdict(cfg))
    log.info("ppo: %d train prompts, %d per iteration over %d ranks, %d updates of %d sequences per iteration",
             len(prompts.train), pcfg.rollout_batch_size, world, updates_per_iter, tcfg.global_batch_size)

    sampler, annotator = BlockSampler(len(prompts.train), tcfg.seed), RuleAnnotator()
    shaping = ScoreShaping(pcfg.missing_eos_penalty, pcfg.normalize_reward, pcfg.reward_clip)
    guard = NumericalGuard(tcfg.max_bad_steps, ckpt_root / "actor")
    started = time.perf_counter()
    with STOP.deferred():  # a stop signal ends the run after its iteration, with a checkpoint
        for it in range(start, tcfg.max_steps):
            # 1-3. experience: generate, score, shape, advantages --------------------------------------
            indices = next(iter(sampler.micro_batches(it, pcfg.rollout_batch_size, local, dist.rank, world)))
            batch_prompts = [prompts.train[i] for i in indices]
            t0 = time.perf_counter()
            generator = torch.Generator(device=dist.device).manual_seed(tcfg.seed * 1_000_003 + it * 1009 + dist.rank)
            gen, rollout = generate_rollout(actor, batch_prompts, sampling, generator,
                                            all_finished=every_rank_finished if world > 1 else None)
            generation_time, t0 = time.perf_counter() - t0, time.perf_counter()
            score_rollout(rollout, policy=actor, reference=models.reference, reward_model=models.reward_model,
                          critic=critic, micro_batch=mb, temperature=sampling.logprob_temperature)
            ppo_experience(gen, rollout, shaping=shaping, moments=moments, kl_coef=kl_ctl.value,
                           kl_estimator=pcfg.kl_estimator, gamma=pcfg.gamma, lam=pcfg.lam, reduce=all_reduce_sum)
            score_time, t0 = time.perf_counter() - t0, time.perf_counter()

            # 4. update ------------------------------------------------------------------------------
            skipped_before = actor.skipped_steps + critic.skipped_steps
            updated = ppo_update(models, rollout, pcfg, train_actor=it >= pcfg.critic_warmup_iters, iteration=it,
                                 seed=tcfg.seed, minibatch=tcfg.global_batch_size // world, micro_batch=mb, dist=dist,
                                 temperature=sampling.logprob_temperature)
            train_time = time.perf_counter() - t0
            # An iteration any of whose updates was skipped as non-finite counts as one bad step.
            guard.observe(it + 1, skipped=actor.skipped_steps + critic.skipped_steps > skipped_before,
                          loss=updated.get("policy_loss", updated["loss"]), grad_norm=None)

            # 5. observe -----------------------------------------------------------------------------
            responses = decode_responses(tokenizer, gen)
            prompt_texts = [prompts.train_texts[i] for i in indices]
            judged = torch.tensor([annotator.score(p, r, f) for p, r, f in zip(prompt_texts, responses,
                                                                               gen.finished.tolist())],
                                  dtype=torch.float64, device=dist.device)
            row = {"step": it + 1, **rollout_stats(rollout, gen.lengths, judged), "kl_coef": kl_ctl.value,
                   "value_loss": updated.pop("loss"), **updated, "lr": actor.lr, "generation_time": generation_time,
                   **guard.metrics(), "score_time": score_time, "train_time": train_time, "elapsed": time.perf_counter() - started}
            kl_ctl.update(row["kl"], pcfg.rollout_batch_size)
            logger.log(row)
            logger.advance(it + 1, {"reward": row["reward_mean"], "kl": row["kl"], "len": row["response_length"]})
            samples.write([{"step": it + 1, "prompt": prompt_texts[b], "response": responses[b],
                            "response_ids": gen.tokens[b, :int(gen.lengths[b])].tolist(),
                            "finished": bool(gen.finished[b]), "score": float(rollout.scores[b]),
                            "annotator": float(judged[b])} for b in range(min(pcfg.log_samples, local))])

            # 6. checkpoint --------------------------------------------------------------------------
            done = it + 1
            stop = STOP.poll(dist)
            if guard.healthy and ((tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.max_steps or stop):
                state = {"kl_controller": kl_ctl.state_dict(), "reward_moments": moments.state_dict(),
                         "config": resume_config(cfg)}
                check_finite_weights(actor, f"the actor checkpoint of iteration {done}", ckpt_root / "actor")
                check_finite_weights(critic, f"the critic checkpoint of iteration {done}", ckpt_root / "actor")
                actor.save_checkpoint(ckpt_root / "actor", done, state, keep=tcfg.keep_checkpoints)
                critic.save_checkpoint(ckpt_root / "critic", done, state, keep=tcfg.keep_checkpoints)
            if stop:
                return stopped_early(stop, done, ckpt_root / "critic", logger, dist)

    export_final(actor, models.actor_cfg, out / "final", out / "tokenizer", dist,
                 extra={"stage": "ppo", "step": tcfg.max_steps, "precision": tcfg.precision,
                        "reward_model": str(pcfg.reward_model)})
    logger.close()
    summary = {"output_dir": str(out), "iterations": tcfg.max_steps, "seconds": time.perf_counter() - started}
    if dist.is_main:
        log.info("done: %s", json.dumps(summary))
    return summary


def ppo_update(models: OnlineModels, rollout: Rollout, pcfg: PPOConfig, *, train_actor: bool, iteration: int,
               seed: int, minibatch: int, micro_batch: int, dist: DistInfo, temperature: float) -> dict[str, float]:
    """``ppo_epochs`` shuffled passes over this rank's rollout rows, ``minibatch`` rows per optimizer step
    (the engines accumulate the micro-batches): clipped policy loss minus the entropy bonus for the actor
    (unless the critic is still warming up), clipped value loss for the critic. Metrics averaged over ranks."""
    actor, critic = models.actor, models.critic
    window = MetricWindow(dist.device)
    for epoch in range(pcfg.ppo_epochs):
        order_rng = torch.Generator().manual_seed(seed * 7919 + iteration * 131 + epoch * 17 + dist.rank)
        order = torch.randperm(len(rollout), generator=order_rng).to(dist.device)
        for m in range(0, len(rollout), minibatch):
            for s in range(m, m + minibatch, micro_batch):
                part = rollout.select(order[s:s + micro_batch])
                metrics: dict[str, torch.Tensor] = {}
                if train_actor:
                    logp, entropy = policy_logprobs(actor, part, temperature)
                    policy_loss, clipfrac = ppo_policy_loss(logp, part.logprobs, part.advantages, part.mask,
                                                            clip_eps=pcfg.clip_eps)
                    entropy_mean = masked_mean(entropy, part.mask)
                    actor.backward(policy_loss - pcfg.entropy_coef * entropy_mean)
                    actor.step()
                    metrics = {"clipfrac": clipfrac, "entropy": entropy_mean,
                               "approx_kl": masked_mean(0.5 * (logp.detach() - part.logprobs) ** 2, part.mask),
                               "policy_loss": policy_loss}
                value_loss = ppo_value_loss(critic_values(critic, part), part.values, part.returns, part.mask,
                                            clip_eps=pcfg.value_clip_eps)
                critic.backward(value_loss)
                critic.step()
                window.add(value_loss, metrics)
    return window.mean()


def rollout_stats(rollout: Rollout, lengths: torch.Tensor, judged: torch.Tensor) -> dict[str, float]:
    """Collective. The rollout's means over every rank: raw score (and its std), sequence KL to the
    reference, response length, finished rate, annotator score, token means of values and returns."""
    mask = rollout.mask
    sums = reduce_sums({
        "score": rollout.scores.double().sum(), "score_sq": (rollout.scores.double() ** 2).sum(),
        "kl": ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(), "length": lengths.double().sum(),
        "finished": rollout.finished.double().sum(), "annotator": judged.sum(),
        "values": (rollout.values * mask).sum(), "returns": (rollout.returns * mask).sum(), "tokens": mask.sum(),
        "rows": torch.tensor(float(len(rollout)), dtype=torch.float64, device=mask.device)})
    n, tokens = sums["rows"], sums["tokens"]
    return {"reward_mean": sums["score"] / n,
            "reward_std": math.sqrt(max(sums["score_sq"] / n - (sums["score"] / n) ** 2, 0.0)),
            "kl": sums["kl"] / n, "response_length": sums["length"] / n, "finished_rate": sums["finished"] / n,
            "annotator_score": sums["annotator"] / n, "values_mean": sums["values"] / tokens,
            "returns_mean": sums["returns"] / tokens}
