"""Stage 3b: direct preference optimisation (Rafailov et al. 2023).

The policy starts from the SFT export; the reference is that same export, frozen. Because the policy
equals the reference before its first step, the reference log-probabilities are computed with the
policy engine itself before training (and before a checkpoint is restored, so also on resume), for
exactly the pairs this run will visit (the data order is a pure function of seed and step) and the
validation pairs it evaluates, and cached in ``<output_dir>/reference_logps.pt``: no second model is
held in memory, under any ZeRO stage.

Each micro-batch runs chosen and rejected rows in one concatenated forward pass;
:func:`llmsys.rlhf.losses.dpo_loss` gives the sigmoid (``dpo.label_smoothing`` > 0: conservative) or
IPO loss, plus ``dpo.nll_weight`` times the chosen responses' per-token NLL (RPO) when set. Metrics:
``reward_accuracy`` (implicit reward of chosen > rejected), ``reward_margin``, ``chosen_reward``,
``rejected_reward``, ``chosen_nll``; evaluation lines carry the same with ``val_``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from llmsys.config import Config
from llmsys.data import BlockSampler
from llmsys.data.preference import PreferencePairs, collate_pairs
from llmsys.distributed import DistInfo, Engine, all_reduce_sum, barrier
from llmsys.models import IGNORE_INDEX
from llmsys.rlhf.losses import chosen_nll_loss, dpo_loss
from llmsys.trainers.components import equal_share, preference_pairs
from llmsys.trainers.lm import Batch, LMData, train_lm

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.pt"


def sequence_logps(engine: Engine, batch: Batch) -> torch.Tensor:
    """Sum of the response tokens' log-probabilities, one per row."""
    logps, _ = engine(batch["input_ids"], labels=batch["labels"], logprobs_temperature=1.0)
    return logps.sum(-1)


def reference_logps(engine: Engine, pairs: PreferencePairs, wanted: list[int], pad: int, micro_batch: int,
                    dist: DistInfo) -> torch.Tensor:
    """(N, 2) chosen/rejected log-probs under the current weights of the pairs ``wanted`` (0 elsewhere).
    Collective: the pairs are split over ranks, every rank runs the same number of forward passes (the
    last rank may repeat a pair, counted once), and the results are summed over ranks."""
    share, n_real = equal_share(wanted, dist, every_item=True)
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=dist.device)
    with engine.evaluating():
        for start in range(0, len(share), micro_batch):
            indices = share[start:start + micro_batch]
            batch = {k: v.to(dist.device) for k, v in collate_pairs([pairs.pair(i) for i in indices], pad).items()}
            logps = sequence_logps(engine, batch).double()
            for row, index in enumerate(indices):
                if start + row < n_real:
                    out[index, 0], out[index, 1] = logps[row], logps[len(indices) + row]
    return all_reduce_sum(out).float().cpu()


def visited_pairs(cfg: Config, train_size: int, val_size: int) -> dict[str, list[int]]:
    """The train pairs of steps ``0 .. max_steps - 1`` and the validation pairs that evaluation reads."""
    tcfg = cfg.trainer
    train = BlockSampler(train_size, tcfg.seed).blocks(0, tcfg.max_steps * tcfg.global_batch_size)
    n_eval = min(tcfg.eval_samples or val_size, val_size) if tcfg.eval_every else 0
    return {"train": sorted(set(train)), "val": list(range(n_eval))}


def run(cfg: Config, dist: DistInfo) -> dict:
    cache_dir, data = preference_pairs(cfg, dist)
    pad = data.tokenizer.pad_id
    out = Path(cfg.trainer.output_dir)
    reference: dict[str, torch.Tensor] = {}

    def compute_reference(engine: Engine) -> None:
        path = out / REFERENCE_FILE
        key = str({"data_cache": str(cache_dir), "init_from": str(cfg.model.init_from)})
        saved = torch.load(path, weights_only=True) if path.is_file() else {}
        if saved.get("key") != key:
            saved = {}
        wanted = visited_pairs(cfg, len(data.train), len(data.val))
        computed = 0
        for split in ("train", "val"):
            values = saved.get(split, torch.full((len(getattr(data, split)), 2), float("nan")))
            missing = [i for i in wanted[split] if bool(values[i].isnan().any())]
            if missing:  # every rank sees the same file, so all agree on what is missing
                fresh = reference_logps(engine, getattr(data, split), missing, pad, cfg.trainer.micro_batch_size,
                                        dist)
                values[missing] = fresh[missing]
                computed += len(missing)
            reference[split] = values
        if computed and dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"key": key, **reference}, tmp)
            os.replace(tmp, path)
        barrier()
        log.info("reference log-probs: %d pairs computed, %d read from %s", computed,
                 sum(len(v) for v in wanted.values()) - computed, path)

    def collate(split: str):
        pairs = getattr(data, split)

        def build(indices: list[int]) -> Batch:
            batch = collate_pairs([pairs.pair(i) for i in indices], pad)
            batch["ref_logps"] = reference[split][indices]
            if bool(batch["ref_logps"].isnan().any()):
                raise RuntimeError(f"DPO: no reference log-probs for {split} pairs {indices}; "
                                   f"{REFERENCE_FILE} does not cover this run (remove it to recompute)")
            return batch
        return build

    dcfg = cfg.dpo

    def loss_fn(engine: Engine, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = sequence_logps(engine, batch)
        half = logps.shape[0] // 2
        ref = batch["ref_logps"]
        loss, chosen, rejected = dpo_loss(logps[:half], logps[half:], ref[:, 0], ref[:, 1], beta=dcfg.beta,
                                          label_smoothing=dcfg.label_smoothing, loss_type=dcfg.loss_type)
        nll = chosen_nll_loss(logps[:half], (batch["labels"][:half] != IGNORE_INDEX).sum(-1))
        if dcfg.nll_weight:
            loss = loss + dcfg.nll_weight * nll
        return loss, {"chosen_nll": nll.detach(), "reward_accuracy": (chosen > rejected).float().mean(),
                      "reward_margin": (chosen - rejected).mean(), "chosen_reward": chosen.mean(),
                      "rejected_reward": rejected.mean(), "chosen_logps": logps[:half].detach().mean()}

    return train_lm(cfg, dist, LMData(
        train_size=len(data.train), collate_train=collate("train"), val_size=len(data.val),
        collate_val=collate("val"), tokenizer_dir=cache_dir / "tokenizer", tokenizer_vocab=data.tokenizer.vocab_size,
        cache_dir=cache_dir, max_tokens_per_sample=cfg.data.seq_len, compute_loss=loss_fn,
        before_training=compute_reference))
