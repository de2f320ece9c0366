"""Stage 3c: PPO against a learned reward model (Ouyang et al. 2022; Ziegler et al. 2019; Schulman et al. 2017).

Four models: the **actor** (trained, from ``model.init_from`` = the SFT export), the **critic**
(trained, a scalar-head model from ``ppo.critic_from`` or the reward model), the frozen
**reference** (the SFT export again) and the frozen **reward model** (``ppo.reward_model``). The
actor and critic are DeepSpeed engines; the frozen ones are replicated under ZeRO 0-2 and
partitioned (optionally offloaded) under ZeRO-3. One iteration, top to bottom:

1. **generate** responses for this rank's share of ``ppo.rollout_batch_size`` prompts with the KV
   cache (temperature, top-p, EOS = the end-of-turn token). Under ZeRO-3 each forward gathers
   parameters collectively, so ranks decode in lockstep: a rank whose sequences have all ended keeps
   stepping until every rank is done. Timed separately (``generation_time``).
2. **score**: actor and reference log-probs of the response tokens, critic values, and the reward
   model's score at the last response token (optionally minus ``missing_eos_penalty``, normalised
   with running statistics, clipped). Per-token reward ``-beta * KL_t`` (estimator k1/k2/k3) with
   the score added at the last token; beta fixed or adaptive (target KL, horizon).
3. **advantages**: GAE (gamma, lambda), whitened over the whole batch (all ranks); returns =
   advantages + values.
4. **update**: ``ppo.ppo_epochs`` passes over minibatches of ``trainer.global_batch_size`` sequences:
   clipped policy loss minus the entropy bonus for the actor, clipped value loss for the critic.
   Log-probs go through ``llmsys.kernels.linear_logprobs`` when ``model.loss=fused``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from llmsys.config import Config, LoRAConfig
from llmsys.data import BlockSampler, IM_END_TOKEN
from llmsys.data.preference import load_prompts
from llmsys.distributed import DistInfo, Engine, FrozenModel, all_reduce_sum, barrier
from llmsys.eval.annotator import RuleAnnotator
from llmsys.models import Transformer, resolve_vocab_size
from llmsys.models.generation import generate
from llmsys.models.heads import ScalarHeadModel, fresh_head_param, is_scalar_export
from llmsys.models.lora import is_lora_param
from llmsys.rlhf.advantages import gae
from llmsys.rlhf.kl import AdaptiveKLController, FixedKLController, kl_penalty
from llmsys.rlhf.losses import masked_mean, ppo_policy_loss, ppo_value_loss
from llmsys.trainers.lm import MetricWindow, export_final, initial_weights, resume_path
from llmsys.trainers.observe import MetricsLogger, write_run_config
from llmsys.trainers.sft import model_tokenizer

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


@dataclass
class Rollout:
    """A batch of prompt + response sequences, right-padded, and what PPO computed for them.

    Response token ``r`` of row ``b`` is predicted at position ``positions[b, r]`` of ``input_ids``
    (the position before it); per-token tensors are ``(B, R)`` with ``mask`` 1 on real tokens.
    """

    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) the response tokens at their predicting positions, else -100
    positions: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) float
    last_index: torch.Tensor  # (B,) position of the last response token
    finished: torch.Tensor  # (B,) bool, ended with the end-of-turn token
    logprobs: Optional[torch.Tensor] = None  # (B, R) actor, at generation time
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None  # (B,) raw reward-model scores
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Rollout":
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in dataclasses.fields(self)})


def build_rollout(prompts: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor, finished: torch.Tensor,
                  filler: int) -> Rollout:
    """Concatenate each prompt with its generated tokens (``lengths[b]`` of row b of ``tokens``)."""
    B, R = tokens.shape
    device = tokens.device
    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)
    total = prompt_lens + lengths
    input_ids = torch.full((B, int(total.max())), filler, dtype=torch.long, device=device)
    labels = torch.full_like(input_ids, -100)
    r = torch.arange(R, device=device)
    mask = (r[None, :] < lengths[:, None])
    positions = (prompt_lens[:, None] - 1 + r[None, :]).clamp(max=input_ids.shape[1] - 1)
    for b, prompt in enumerate(prompts):
        n, p = int(lengths[b]), len(prompt)
        input_ids[b, :p] = torch.as_tensor(prompt, device=device)
        input_ids[b, p:p + n] = tokens[b, :n]
        labels[b, p - 1:p - 1 + n] = tokens[b, :n]
    return Rollout(input_ids, labels, positions, mask.float(), total - 1, finished)


def _at_response(per_position: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    return per_position.gather(1, rollout.positions) * rollout.mask


def policy_logprobs(model, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, R) log-probs and entropies of the response tokens under ``model`` (an engine or frozen model)."""
    logp, entropy = model(rollout.input_ids, labels=rollout.labels, logprobs_temperature=temperature)
    return _at_response(logp, rollout), _at_response(entropy, rollout)


def critic_values(model, rollout: Rollout) -> torch.Tensor:
    """(B, R): V of the state before each response token."""
    return _at_response(model(rollout.input_ids), rollout)


class RunningMoments:
    """Mean and variance of every score seen so far, over all ranks (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    def update(self, values: torch.Tensor) -> None:
        stats = all_reduce_sum(torch.stack([values.double().sum(), (values.double() ** 2).sum(),
                                            torch.tensor(float(values.numel()), dtype=torch.float64,
                                                         device=values.device)]))
        total, total_sq, n = stats.tolist()
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean ** 2, 0.0)
        delta, new_count = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / new_count
        self.mean += delta * n / new_count
        self.var, self.count = m2 / new_count, new_count

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


def global_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries of every rank's batch (advantage whitening)."""
    stats = all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double())
    total, total_sq, n = stats.tolist()
    mean = total / n
    var = max(total_sq / n - mean ** 2, 0.0)
    return (x - mean) * torch.rsqrt(torch.tensor(var + 1e-8, device=x.device)) * mask


def run(cfg: Config, dist: DistInfo) -> dict:
    pcfg, tcfg = cfg.ppo, cfg.trainer
    out = Path(tcfg.output_dir)
    ckpt_root = out / "checkpoints"
    world = dist.world_size
    if pcfg.rollout_batch_size % (tcfg.micro_batch_size * world):
        raise ValueError(f"ppo.rollout_batch_size={pcfg.rollout_batch_size} must be a multiple of "
                         f"trainer.micro_batch_size * world_size = {tcfg.micro_batch_size * world}")
    if not is_scalar_export(pcfg.reward_model):
        raise ValueError(f"ppo.reward_model={pcfg.reward_model}: not a reward model export (its config.json "
                         f"lacks \"head\": \"scalar\"); give the final/ directory of a stage=reward run")
    critic_from = pcfg.critic_from or pcfg.reward_model

    tokenizer = model_tokenizer(cfg)
    eos = tokenizer.token_to_id(IM_END_TOKEN)
    if eos is None or (cfg.data.chat_template != "chatml" and tokenizer.hf_config().get("chat_template")):
        eos = tokenizer.eos_id  # a tokenizer's own template ends turns with its EOS token
    filler = tokenizer.pad_id
    prompts = load_prompts(cfg.data, tokenizer, max_len=cfg.data.seq_len - pcfg.max_new_tokens)
    if not prompts.train:
        raise ValueError(f"data: no prompts found in {cfg.data.path or cfg.data.dataset}")
    tokenizer_dir = out / "tokenizer"
    if dist.is_main:
        tokenizer.save(tokenizer_dir)

    # --- models ---------------------------------------------------------------------------------
    actor_cfg, sft_state = initial_weights(cfg.model, cfg.model.init_from, dist, cfg.deepspeed.stage)
    actor_cfg = dataclasses.replace(actor_cfg, vocab_size=resolve_vocab_size(actor_cfg, tokenizer.vocab_size))
    if cfg.data.seq_len > actor_cfg.max_seq_len or pcfg.max_new_tokens >= cfg.data.seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} (prompt + response) must exceed ppo.max_new_tokens="
                         f"{pcfg.max_new_tokens} and fit the model's max_seq_len={actor_cfg.max_seq_len}")
    reward_cfg, reward_state = initial_weights(cfg.model, pcfg.reward_model, dist, cfg.deepspeed.stage)
    critic_cfg, critic_state = ((reward_cfg, reward_state) if critic_from == pcfg.reward_model  # read it once
                                else initial_weights(cfg.model, critic_from, dist, cfg.deepspeed.stage))
    for name, other in (("ppo.reward_model", reward_cfg), ("ppo.critic_from", critic_cfg)):
        if other.vocab_size != actor_cfg.vocab_size:
            raise ValueError(f"{name} has a vocabulary of {other.vocab_size}, the actor {actor_cfg.vocab_size}; "
                             f"all PPO models must share the SFT model's tokenizer")
    # LoRA (model.lora.*) applies to the actor only: the critic is trained in full, the others are frozen.
    no_lora = LoRAConfig()
    reward_cfg = dataclasses.replace(reward_cfg, lora=no_lora, activation_checkpointing=False)
    critic_cfg = dataclasses.replace(critic_cfg, lora=no_lora)
    ref_cfg = dataclasses.replace(actor_cfg, lora=no_lora, activation_checkpointing=False)

    updates_per_iter = pcfg.ppo_epochs * (pcfg.rollout_batch_size // tcfg.global_batch_size)
    total_updates = tcfg.max_steps * updates_per_iter
    torch.manual_seed(tcfg.seed)
    actor = Engine(lambda: Transformer(actor_cfg), ds=cfg.deepspeed, optim=cfg.optim, trainer=tcfg, dist=dist,
                   max_steps=total_updates, init_state=sft_state, fresh_param=is_lora_param)
    critic_optim = dataclasses.replace(cfg.optim, lr=pcfg.critic_lr or cfg.optim.lr)
    critic = Engine(lambda: ScalarHeadModel(critic_cfg), ds=cfg.deepspeed, optim=critic_optim, trainer=tcfg,
                    dist=dist, max_steps=total_updates, init_state=critic_state, fresh_param=fresh_head_param)
    del critic_state
    reference = FrozenModel(lambda: Transformer(ref_cfg), ds=cfg.deepspeed, trainer=tcfg, dist=dist,
                            init_state=sft_state, offload=pcfg.offload_frozen)
    del sft_state
    reward_model = FrozenModel(lambda: ScalarHeadModel(reward_cfg), ds=cfg.deepspeed, trainer=tcfg, dist=dist,
                               init_state=reward_state, offload=pcfg.offload_frozen)
    del reward_state

    kl_ctl = (AdaptiveKLController(pcfg.init_kl_coef, pcfg.kl_target, pcfg.kl_horizon) if pcfg.adaptive_kl
              else FixedKLController(pcfg.init_kl_coef))
    moments = RunningMoments()
    start = 0
    resume_from = resume_path(cfg, ckpt_root / "critic")
    if resume_from is not None:
        state = critic.load_checkpoint(resume_from)
        actor.load_checkpoint(ckpt_root / "actor" / resume_from.name)
        kl_ctl.load_state_dict(state["kl_controller"])
        moments.load_state_dict(state["reward_moments"])
        start = state["step"]
        log.info("resumed from %s at iteration %d", resume_from, start)
    if dist.is_main:
        write_run_config(out, cfg, {"deepspeed_config.json": json.dumps(actor.config, indent=2) + "\n"})
        if start == 0:
            (out / SAMPLES_FILE).unlink(missing_ok=True)
    barrier()
    logger = MetricsLogger(out, cfg.logger, enabled=dist.is_main, total_steps=tcfg.max_steps, start_step=start,
                           run_config=dataclasses.asdict(cfg))
    log.info("ppo: %d train prompts, %d per iteration over %d ranks, %d updates of %d sequences per iteration",
             len(prompts.train), pcfg.rollout_batch_size, world, updates_per_iter, tcfg.global_batch_size)

    sampler = BlockSampler(len(prompts.train), tcfg.seed)
    annotator = RuleAnnotator()
    temperature = pcfg.temperature if pcfg.temperature > 0 else 1.0
    local = pcfg.rollout_batch_size // world
    mb = tcfg.micro_batch_size

    def every_rank_finished(done: torch.Tensor) -> bool:
        return float(all_reduce_sum((~done).sum().double().reshape(1))[0]) == 0.0

    started = time.perf_counter()
    for it in range(start, tcfg.max_steps):
        # 1. generate ------------------------------------------------------------------------
        indices = next(iter(sampler.micro_batches(it, pcfg.rollout_batch_size, local, dist.rank, world)))
        batch_prompts = [prompts.train[i] for i in indices]
        t0 = time.perf_counter()
        gen_rng = torch.Generator(device=dist.device).manual_seed(tcfg.seed * 1_000_003 + it * 1009 + dist.rank)
        with actor.evaluating():
            gen = generate(actor.module, batch_prompts, pcfg.max_new_tokens, temperature=pcfg.temperature,
                           top_p=pcfg.top_p, eos_id=eos, pad_id=filler, generator=gen_rng,
                           all_finished=every_rank_finished if world > 1 else None)
        generation_time = time.perf_counter() - t0

        # 2. score ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        rollout = build_rollout(batch_prompts, gen.tokens, gen.lengths, gen.finished, filler)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprobs", "ref_logprobs", "values", "scores")}
        with actor.evaluating(), critic.evaluating():
            for s in range(0, local, mb):
                part = rollout.select(torch.arange(s, min(s + mb, local), device=dist.device))
                parts["logprobs"].append(policy_logprobs(actor, part, temperature)[0])
                parts["ref_logprobs"].append(policy_logprobs(reference, part, temperature)[0])
                parts["values"].append(critic_values(critic, part))
                parts["scores"].append(reward_model(part.input_ids, last_index=part.last_index))
        for key, chunks in parts.items():
            setattr(rollout, key, torch.cat([c.float() for c in chunks]))
        mask = rollout.mask
        scores = rollout.scores - pcfg.missing_eos_penalty * (~rollout.finished).float()
        if pcfg.normalize_reward:
            moments.update(scores)
            scores = (scores - moments.mean) / moments.std
        if pcfg.reward_clip:
            scores = scores.clamp(-pcfg.reward_clip, pcfg.reward_clip)
        kl_tokens = kl_penalty(rollout.logprobs, rollout.ref_logprobs, pcfg.kl_estimator) * mask
        rewards = -kl_ctl.value * kl_tokens
        rows = torch.arange(local, device=dist.device)
        rewards[rows, gen.lengths.long() - 1] += scores

        # 3. advantages ----------------------------------------------------------------------
        advantages, returns = gae(rewards, rollout.values, mask, gamma=pcfg.gamma, lam=pcfg.lam)
        rollout.advantages, rollout.returns = global_whiten(advantages, mask), returns
        score_time = time.perf_counter() - t0

        # 4. update --------------------------------------------------------------------------
        t0 = time.perf_counter()
        train_actor = it >= pcfg.critic_warmup_iters
        window = MetricWindow(dist.device)
        minibatch = tcfg.global_batch_size // world
        for epoch in range(pcfg.ppo_epochs):
            order_rng = torch.Generator().manual_seed(tcfg.seed * 7919 + it * 131 + epoch * 17 + dist.rank)
            order = torch.randperm(local, generator=order_rng).to(dist.device)
            for m in range(0, local, minibatch):
                for s in range(m, m + minibatch, mb):
                    part = rollout.select(order[s:s + mb])
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
                    values = critic_values(critic, part)
                    value_loss = ppo_value_loss(values, part.values, part.returns, part.mask,
                                                clip_eps=pcfg.value_clip_eps)
                    critic.backward(value_loss)
                    critic.step()
                    window.add(value_loss, metrics)
        train_time = time.perf_counter() - t0

        # 5. observe -------------------------------------------------------------------------
        responses = [tokenizer.decode(gen.tokens[b, :int(gen.lengths[b]) - int(gen.finished[b])].tolist())
                     for b in range(local)]
        prompt_texts = [prompts.train_texts[i] for i in indices]
        finished_list = gen.finished.tolist()
        judged = torch.tensor([annotator.score(p, r, f) for p, r, f in zip(prompt_texts, responses, finished_list)],
                              dtype=torch.float64, device=dist.device)
        sums = all_reduce_sum(torch.stack([
            rollout.scores.double().sum(), (rollout.scores.double() ** 2).sum(),
            ((rollout.logprobs - rollout.ref_logprobs) * mask).sum().double(), gen.lengths.double().sum(),
            gen.finished.double().sum(), judged.sum(), (rollout.values * mask).sum().double(),
            (returns * mask).sum().double(), mask.sum().double(),
            torch.tensor(float(local), dtype=torch.float64, device=dist.device)]))
        (score_sum, score_sq, kl_sum, len_sum, fin_sum, judged_sum, value_sum, return_sum, token_count,
         n) = sums.tolist()
        kl = kl_sum / n
        updated = window.mean()
        row = {"step": it + 1, "reward_mean": score_sum / n,
               "reward_std": math.sqrt(max(score_sq / n - (score_sum / n) ** 2, 0.0)),
               "kl": kl, "kl_coef": kl_ctl.value, "response_length": len_sum / n, "finished_rate": fin_sum / n,
               "annotator_score": judged_sum / n, "value_loss": updated.pop("loss"), **updated,
               "values_mean": value_sum / token_count, "returns_mean": return_sum / token_count,
               "lr": actor.lr, "generation_time": generation_time, "score_time": score_time,
               "train_time": train_time, "elapsed": time.perf_counter() - started}
        kl_ctl.update(kl, pcfg.rollout_batch_size)
        logger.log(row)
        logger.advance(it + 1, {"reward": row["reward_mean"], "kl": kl, "len": row["response_length"]})
        if dist.is_main and pcfg.log_samples:
            with open(out / SAMPLES_FILE, "a") as f:
                for b in range(min(pcfg.log_samples, local)):
                    f.write(json.dumps({"step": it + 1, "prompt": prompt_texts[b], "response": responses[b],
                                        "response_ids": gen.tokens[b, :int(gen.lengths[b])].tolist(),
                                        "finished": finished_list[b], "score": float(rollout.scores[b]),
                                        "annotator": float(judged[b])}) + "\n")

        # 6. checkpoint ----------------------------------------------------------------------
        done = it + 1
        if (tcfg.save_every and done % tcfg.save_every == 0) or done == tcfg.max_steps:
            state = {"kl_controller": kl_ctl.state_dict(), "reward_moments": moments.state_dict()}
            actor.save_checkpoint(ckpt_root / "actor", done, state, keep=tcfg.keep_checkpoints)
            critic.save_checkpoint(ckpt_root / "critic", done, state, keep=tcfg.keep_checkpoints)

    export_final(actor, actor_cfg, out / "final", tokenizer_dir, dist,
                 extra={"stage": "ppo", "step": tcfg.max_steps, "precision": tcfg.precision,
                        "reward_model": str(pcfg.reward_model)})
    logger.close()
    summary = {"output_dir": str(out), "iterations": tcfg.max_steps, "seconds": time.perf_counter() - started}
    if dist.is_main:
        log.info("done: %s", json.dumps(summary))
    return summary
