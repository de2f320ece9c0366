"""Peers in the same run: llmsys against a plain PyTorch loop (the floor) and TRL, on the same work.

Each measurement is its own fresh process on the same model, the same tokens and the same settings; a
round runs every implementation once per stage, back to back (the order rotated from round to round),
and the ratios are taken within the round: a shared CPU drifts by tens of percent over minutes. Three
rounds; the medians, with each ratio's range over the rounds, are the result. Everything runs on the CPU.

- **llmsys**: real ``python -m llmsys.train stage=sft|dpo|grpo`` runs; SFT/DPO step times come from the
  trainer's own meter in ``metrics.jsonl`` (``trainer.log_every=1``: one row per step, collate + forward +
  backward + optimizer step; reference log-probs, evaluation, checkpoint and export excluded), a GRPO
  iteration is its logged generation + scoring + training time.
- **plain** (SFT, DPO): a plain PyTorch loop, no framework: forward, backward, ``torch.optim.AdamW`` as a
  user writes it (``AdamW(model.parameters(), lr=...)``: torch's default implementation, a for-loop on the
  CPU), zero_grad. It trains ``llmsys.models.Transformer`` built from the same export (same weights, same
  SDPA/eager kernels), so what differs is the loop and the batch layout, never the model code. SFT runs the
  micro-batch's packed rows as a right-padded ``(rows, seq_len)`` batch with each row's own block-diagonal
  causal mask (no example sees another, RoPE restarts at every example; attention costs rows x seq_len^2),
  which is how one writes packing by hand. DPO runs the pairs as ``(2 x pairs, T)`` chosen-then-rejected
  rows, right-padded, with log-probs from ``log_softmax(logits)``. Each step is timed with the boundaries of
  llmsys's meter (collate included) and split into collate / forward / backward / optimizer
  (``phase_seconds``, the first step left out).
- **trl** (when installed: ``pip install trl``): ``SFTTrainer`` with ``packing=True`` (its default ``bfd``
  strategy, padding-free), ``DPOTrainer`` with ``precompute_ref_log_probs=True`` and ``GRPOTrainer``
  (transformers ``generate``), on the model converted by llmsys's own Hugging Face export
  (``llmsys.models.hf.export_hf``), with llmsys's batch, optimizer settings and schedule, no clipping, fp32,
  TRL's defaults otherwise (its default optimizer is torch's fused AdamW). A step is the gap between two
  ``on_step_end`` callbacks.

**The same work.** One random-init export (by default the issue's shape: a Llama of hidden 256, 4 layers,
4 heads, 2 KV heads, FFN 688, vocabulary 8192 with a BPE of that size trained on the embedded Shakespeare,
untied, fp32, sequence 256, micro-batch 8, AdamW, no clipping) is the SFT model, DPO's policy and reference,
and GRPO's actor and reference (throughput does not depend on the weights). SFT: the embedded chatterbot
conversations as llmsys tokenises and packs them (``data=chat``); llmsys and the plain loop visit the very
same packed rows in the same order (llmsys's ``BlockSampler``; checked: the token counts of every step
agree or the run fails), TRL gets the same tokenised examples and target masks and packs them itself
(best-fit decreasing, as llmsys does). DPO: the embedded ranked pairs (``data=prefs``), the same pairs in the
same order on all three sides (checked likewise; TRL through a ``DPOTrainer`` that takes llmsys's token ids
as they are). Reference log-probs are computed before training on every side and never timed. GRPO: the
embedded arithmetic prompts (``data=arith``) in llmsys's order, 8 prompts x 4 responses of at most 16 tokens
per iteration (``GRPO_GROUP``, ``GRPO_NEW_TOKENS``), temperature 1, KL 0.04 to the reference as a loss
term, token-mean clipped loss, one optimizer step per iteration over the whole rollout in micro-batches of
8; TRL renders the prompts with the export's chat template (checked equal to llmsys's ids) and rewards
with llmsys's exact-answer check.

**Counting tokens.** Real tokens only, no padding, on every side. SFT: the tokens of the examples in the
step's packed rows (llmsys's own count, which has no padding to begin with; TRL's padding-free batch
likewise). DPO: prompt + response tokens of the chosen and of the rejected sequence of every pair, i.e. the
non-padding positions of the ``(2B, T)`` batch (llmsys's own meter counts the padded ``2B x T``: kept as
``llmsys_counted_tokens``). GRPO: every response's prompt and generated tokens; GRPO rows also carry
``samples_per_sec`` (responses per second of iteration), ``generated_tokens_per_generation_sec`` and
``generation_share``. ``tokens_per_sec`` = sum(tokens) / sum(step seconds) over the steps after ``--warmup``.

    python benchmarks/peers.py --smoke                      # CI: a tiny shape, one round of 4 steps
    python benchmarks/peers.py                              # the issue's shape: 3 rounds of SFT, DPO, GRPO
    python benchmarks/peers.py --stages sft --impls plain,llmsys --rounds 1 --steps 12
    python benchmarks/peers.py --variant fix=/path/launcher.py   # + llmsys through a patched launcher

``--variant NAME=LAUNCHER`` adds the implementation ``llmsys:NAME``: the same llmsys run started as
``python LAUNCHER <overrides>`` instead of ``python -m llmsys.train`` (a script that patches llmsys, then runs
``llmsys.train``), to measure a change against the unchanged code in the same rounds.

Rows (``peers-<device>-<date>[-smoke].json`` in $OUT or benchmarks/results/, a PNG beside it): ``kind``
``"round"`` per (round, stage, implementation) with ``tokens_per_sec`` and ``ratio_vs_<peer>`` = its tokens/s
over the peer's in that round; ``kind`` ``"median"`` per (stage, implementation) with the medians over the
rounds and ``ratio_vs_<peer>_range``. Targets (printed ``TARGET ... PASS/FAIL``, never the exit status):
SFT llmsys >= 0.9x the plain loop, DPO llmsys >= 2x TRL.

**For other benchmarks** (``benchmarks/stages.py --peers``) the entry point is::

    run_peers(stages: Sequence[str] = ("sft", "dpo", "grpo"), impls: Sequence[str] = ("plain", "llmsys", "trl"),
              *, rounds: int = 3, steps: int = 20, warmup: int = 4, shape: Shape = ISSUE_SHAPE,
              work_dir: Path | None = None, variants: Mapping[str, Path] | None = None,
              log: Callable[[str], None] = print) -> list[dict]

It runs the measurements (subprocesses with the caller's environment, on the CPU: set ``OMP_NUM_THREADS``
and ``LLMSYS_HOME`` there) and returns the JSON-able rows above, unstamped (no device/versions/date: the
caller stamps them); ``targets(rows)`` prints and returns the TARGET checks. ``"trl"`` is left out, with a
log line, when TRL is not installed; ``"plain"`` runs SFT and DPO only. A failing run raises
``RuntimeError`` with its command and stderr tail; bad arguments raise ``ValueError``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

STAGES = ("sft", "dpo", "grpo")
PEERS = ("plain", "llmsys", "trl")
PLAIN_STAGES = ("sft", "dpo")  # the plain loop has no generation: GRPO is llmsys against TRL
GRPO_GROUP = 4  # responses per prompt; a rollout is micro_batch prompts x GRPO_GROUP responses
GRPO_NEW_TOKENS = 16
TARGETS = {  # (stage, ours, theirs): the ratio ours / theirs must reach
    ("sft", "llmsys", "plain"): 0.9,
    ("dpo", "llmsys", "trl"): 2.0,
}


@dataclass(frozen=True)
class Shape:
    """The model and batch every implementation runs."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int  # embedding rows; also the size of the BPE trained for it
    seq_len: int  # packed SFT row length; longest DPO sequence
    micro_batch: int  # packed rows (SFT) or pairs (DPO) per step; one micro-batch per optimizer step


ISSUE_SHAPE = Shape(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688, vocab_size=8192, seq_len=256,
                    micro_batch=8)
SMOKE_SHAPE = Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=512, seq_len=64,
                    micro_batch=4)


# -- the shared setup: tokenizer, the export every side starts from, the llmsys config -------------


def prepare(work: Path, shape: Shape, with_hf: bool) -> Path:
    """The random-init llmsys export of ``shape`` (with its tokenizer: a byte-level BPE of ``shape.vocab_size``
    trained on the embedded Shakespeare, cached by llmsys) in ``work/base``, and its Hugging Face conversion in
    ``work/hf`` when ``with_hf``. Returns ``work/base``."""
    from llmsys.config import ModelConfig
    from llmsys.data import data_cache_root
    from llmsys.data.tokenizer import get_tokenizer
    from llmsys.models import Transformer
    from llmsys.models.export import save_pretrained
    from llmsys.pipeline import compose_config

    base = work / "base"
    data_cfg = compose_config(["data=shakespeare", f"data.bpe_vocab_size={shape.vocab_size}"]).data
    tokenizer = get_tokenizer(data_cfg, data_cache_root(data_cfg))
    if tokenizer.vocab_size > shape.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens > the model's {shape.vocab_size}")
    cfg = ModelConfig(name="peers", dim=shape.dim, n_layers=shape.n_layers, n_heads=shape.n_heads,
                      n_kv_heads=shape.n_kv_heads, ffn_dim=shape.ffn_dim, vocab_size=shape.vocab_size,
                      max_seq_len=shape.seq_len, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model.state_dict(), cfg, base, tokenizer_dir=tokenizer.save(Path(tmp) / "tokenizer"),
                        extra={"stage": "peers-benchmark"})
    if with_hf:
        from llmsys.models.hf import export_hf

        export_hf(base, work / "hf")
    return base


def llmsys_overrides(stage: str, shape: Shape, base: Path, steps: int, output_dir: Path) -> list[str]:
    """The ``llmsys.train`` overrides of one measurement; the plain loop and TRL compose the same config.

    GRPO: ``steps`` iterations, each ``micro_batch`` prompts x ``GRPO_GROUP`` responses of at most
    ``GRPO_NEW_TOKENS`` tokens on the embedded arithmetic task, then one optimizer step over the whole
    rollout in micro-batches of ``micro_batch`` sequences (KL to the reference as a loss term)."""
    rollout = shape.micro_batch * GRPO_GROUP
    data = {"sft": "chat", "dpo": "prefs", "grpo": "arith"}[stage]
    per_stage = ([f"grpo.group_size={GRPO_GROUP}", f"grpo.rollout_batch_size={rollout}",
                  f"grpo.max_new_tokens={GRPO_NEW_TOKENS}", "grpo.log_samples=0"] if stage == "grpo" else [])
    return [
        f"stage={stage}", f"data={data}", f"model.init_from={base}",
        f"data.seq_len={shape.seq_len}", f"trainer.micro_batch_size={shape.micro_batch}",
        f"trainer.global_batch_size={rollout if stage == 'grpo' else shape.micro_batch}", f"trainer.max_steps={steps}",
        "trainer.precision=fp32", "optim.grad_clip=0", "trainer.eval_every=0", "trainer.save_every=0",
        "trainer.log_every=1", "logger.progress=false", "deepspeed=zero0", f"trainer.output_dir={output_dir}",
        *per_stage,
    ]


def compose(overrides: Sequence[str]):
    from llmsys.pipeline import compose_config

    return compose_config(list(overrides))


def sft_rows(cfg):
    """The packed SFT rows llmsys trains on with ``cfg`` (its own cache, built on first use)."""
    from llmsys.data import data_cache_root, load_sft_data, prepare_sft_data
    from llmsys.trainers.components import model_tokenizer

    data = load_sft_data(prepare_sft_data(cfg.data, data_cache_root(cfg.data), tokenizer=model_tokenizer(cfg)))
    return data.packed("train")


def preference_pairs(cfg):
    """The train pairs of llmsys's DPO with ``cfg``, and the pad id."""
    from llmsys.data import data_cache_root, load_preference_data, prepare_preference_data
    from llmsys.trainers.components import model_tokenizer

    tokenizer = model_tokenizer(cfg)
    data = load_preference_data(prepare_preference_data(cfg.data, data_cache_root(cfg.data), tokenizer=tokenizer))
    return data.train, data.tokenizer.pad_id


def grpo_prompts(cfg):
    """The prompt set llmsys's GRPO generates from with ``cfg`` (each prompt's last seq_len - max_new tokens)."""
    from llmsys.data.prompts import load_prompts
    from llmsys.trainers.components import model_tokenizer

    return load_prompts(cfg.data, model_tokenizer(cfg), max_len=cfg.data.seq_len - cfg.grpo.max_new_tokens)


def grpo_iteration_prompts(cfg, num_prompts: int) -> Iterator[list[int]]:
    """The prompt indices of each GRPO iteration, in llmsys's order (each answered group_size times)."""
    from llmsys.data import BlockSampler

    sampler = BlockSampler(num_prompts, cfg.trainer.seed)
    per_iter = cfg.grpo.rollout_batch_size // cfg.grpo.group_size
    for it in range(cfg.trainer.max_steps):
        yield sampler.micro_batches(it, per_iter, per_iter, 0, 1)[0]


def step_indices(cfg, num_samples: int) -> Iterator[list[int]]:
    """The sample indices of each optimizer step (one micro-batch each), in llmsys's order."""
    from llmsys.data import BlockSampler

    sampler = BlockSampler(num_samples, cfg.trainer.seed)
    for step in range(cfg.trainer.max_steps):
        (indices,) = sampler.micro_batches(step, cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, 0, 1)
        yield indices


def real_tokens_per_step(stage: str, cfg) -> list[int]:
    """Real (non-padding) tokens of every step of the run ``cfg`` describes: the counting rule of every side."""
    if stage == "sft":
        rows = sft_rows(cfg)
        lengths = rows.examples.lengths
        return [int(sum(lengths[e] for row in indices for e in rows.rows[row])) for indices in
                step_indices(cfg, len(rows))]
    pairs, _ = preference_pairs(cfg)
    out = []
    for indices in step_indices(cfg, len(pairs)):
        prompt_chosen_rejected = [pairs.pair(i) for i in indices]
        out.append(sum(2 * len(p) + len(c) + len(r) for p, c, r in prompt_chosen_rejected))
    return out


# -- the plain PyTorch loop -------------------------------------------------------------------------


def _plain_model(cfg):
    from llmsys.models import Transformer
    from llmsys.models.pretrained import init_config, load_state

    model_cfg = init_config(cfg.model.init_from, cfg.model)
    model = Transformer(model_cfg)
    model.load_state_dict(load_state(cfg.model.init_from, model_cfg))
    return model


def _rows_batch(rows, indices: list[int], seq_len: int) -> dict[str, torch.Tensor]:
    """Packed rows ``indices`` as a right-padded ``(R, seq_len)`` batch: RoPE positions restarting at each
    example, labels -100 on padding, and each row's block-diagonal causal mask ``(R, 1, seq_len, seq_len)``
    (a padding position sees only itself, so no softmax row is empty)."""
    n = len(indices)
    input_ids = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    positions = torch.zeros((n, seq_len), dtype=torch.long)
    example_id = torch.arange(seq_len).repeat(n, 1) + seq_len
    for r, row in enumerate(indices):
        start = 0
        for k, example in enumerate(rows.rows[row]):
            ids, example_labels = rows.examples[example]
            stop = start + len(ids)
            input_ids[r, start:stop], labels[r, start:stop] = ids, example_labels
            positions[r, start:stop] = torch.arange(len(ids))
            example_id[r, start:stop] = k
            start = stop
    mask = (example_id[:, :, None] == example_id[:, None, :]) & (positions[:, :, None] >= positions[:, None, :])
    return {"input_ids": input_ids, "labels": labels, "positions": positions, "mask": mask[:, None]}


def _rows_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of a :func:`_rows_batch` through the model's own layers: the per-row mask and
    positions stand in for the one packed sequence that ``Transformer.forward(cu_seqlens=...)`` takes."""
    from llmsys.models.transformer import Packing, rotary_tables

    cfg = model.cfg
    cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    positions = batch["positions"]
    # One "chunk" spanning every row, with each row's own mask: SDPA attends row by row in one call.
    packing = Packing(cu_seqlens=torch.zeros(0, dtype=torch.int32), max_seqlen=positions.shape[1],
                      positions=positions, chunks=[(0, positions.shape[1], batch["mask"])])
    h = model.tok_embeddings(batch["input_ids"])
    for layer in model.layers:
        h = layer(h, cos[positions], sin[positions], packing)
    return model.output(model.norm(h), batch["labels"])


def _sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(label) over each row's response tokens, from the full logits."""
    logits = model(batch["input_ids"]).float()
    labels = batch["labels"]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(-1)


def plain_run(stage: str, cfg) -> dict:
    """``cfg.trainer.max_steps`` steps of ``stage`` in a plain loop: per-step seconds and real tokens, and the
    collate / forward / backward / optimizer split of the steps after the first."""
    from llmsys.data import collate_pairs

    torch.manual_seed(cfg.trainer.seed)
    model = _plain_model(cfg)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                  weight_decay=o.weight_decay)
    if stage == "sft":
        rows = sft_rows(cfg)
        steps = list(step_indices(cfg, len(rows)))

        def collate(indices: list[int]) -> tuple[dict, int]:
            return _rows_batch(rows, indices, cfg.data.seq_len), int(sum(
                rows.examples.lengths[e] for row in indices for e in rows.rows[row]))

        def loss_of(batch: dict) -> torch.Tensor:
            return _rows_loss(model, batch)
    else:
        pairs, pad_id = preference_pairs(cfg)
        steps = list(step_indices(cfg, len(pairs)))
        beta = cfg.dpo.beta
        reference: dict[int, torch.Tensor] = {}
        model.eval()
        with torch.no_grad():  # the reference log-probs of every visited pair, before training (not timed)
            for indices in steps:
                logps = _sequence_logps(model, collate_pairs([pairs.pair(i) for i in indices], pad_id))
                for row, i in enumerate(indices):
                    reference[i] = torch.stack((logps[row], logps[len(indices) + row]))

        def collate(indices: list[int]) -> tuple[dict, int]:
            batch = collate_pairs([pairs.pair(i) for i in indices], pad_id)
            batch["ref"] = torch.stack([reference[i] for i in indices])
            return batch, int(batch["attention_mask"].sum())

        def loss_of(batch: dict) -> torch.Tensor:
            logps = _sequence_logps(model, batch)
            half = logps.shape[0] // 2
            margin = (logps[:half] - batch["ref"][:, 0]) - (logps[half:] - batch["ref"][:, 1])
            return -torch.nn.functional.logsigmoid(beta * margin).mean()

    model.train()
    seconds, tokens = [], []
    phases = dict.fromkeys(("collate", "forward", "backward", "optimizer"), 0.0)
    for n, indices in enumerate(steps):
        t0 = time.perf_counter()
        batch, real = collate(indices)
        t1 = time.perf_counter()
        loss = loss_of(batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        seconds.append(t4 - t0)
        tokens.append(real)
        if n:
            for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name] += dt
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"plain {stage}: non-finite loss {float(loss)} at step {n}")
    return {"step_seconds": seconds, "step_tokens": tokens, "phase_seconds": phases,
            "optimizer": "torch.optim.AdamW (default implementation)"}


# -- TRL ----------------------------------------------------------------------------------------------


def _trl_args(config_class, cfg, out: Path, **extra):
    """TRL's config with llmsys's settings: batch, steps, AdamW hyper-parameters and schedule, no clipping,
    fp32, nothing logged, saved or evaluated (``extra`` adds or replaces fields)."""
    o = cfg.optim
    fields = dict(
        output_dir=str(out), per_device_train_batch_size=cfg.trainer.micro_batch_size, gradient_accumulation_steps=1,
        max_steps=cfg.trainer.max_steps, learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, lr_scheduler_type=o.schedule,
        max_grad_norm=0.0, bf16=False, fp16=False, use_cpu=True, seed=cfg.trainer.seed, report_to="none",
        logging_steps=10**9, save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    return config_class(**{**fields, **extra})


def _step_timer(trainer_class, count_tokens: Callable[[dict], int]):
    """``trainer_class`` that records, per optimizer step, its seconds (from the previous step's end, or from the
    start of training, to this step's end) and what was added to ``self.pending`` meanwhile: ``tokens``
    (``count_tokens`` of each micro-batch's inputs) and whatever a subclass counts."""
    from transformers import TrainerCallback

    class Timed(trainer_class):
        def __init__(self, *args, **kwargs):
            self.steps: list[dict] = []
            self.pending: dict[str, float] = {}
            super().__init__(*args, **kwargs)
            outer = self

            class Clock(TrainerCallback):
                def on_train_begin(self, args, state, control, **kwargs):
                    outer._last = time.perf_counter()

                def on_step_end(self, args, state, control, **kwargs):
                    now = time.perf_counter()
                    outer.steps.append({"seconds": now - outer._last, **outer.pending})
                    outer._last, outer.pending = now, {}

            self.add_callback(Clock())

        def count(self, key: str, value: float) -> None:
            self.pending[key] = self.pending.get(key, 0) + value

        def training_step(self, model, inputs, *args, **kwargs):
            self.count("tokens", count_tokens(inputs))
            return super().training_step(model, inputs, *args, **kwargs)

    return Timed


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(str(path))


def _trl_sft(cfg, model, tokenizer, out: Path):
    import datasets
    from trl import SFTConfig, SFTTrainer

    examples = sft_rows(cfg).examples
    raw = [examples.raw(i) for i in range(len(examples))]
    data = datasets.Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in raw],
                                       "assistant_masks": [mask.astype(int).tolist() for _, mask in raw]})

    def count(inputs: dict) -> int:  # padding-free: one row, no padding
        if "attention_mask" in inputs:
            return int(inputs["attention_mask"].sum())
        return int(inputs["input_ids"].numel())

    args = _trl_args(SFTConfig, cfg, out, packing=True, packing_strategy="bfd", max_length=cfg.data.seq_len)
    return _step_timer(SFTTrainer, count)(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _trl_dpo(cfg, model, tokenizer, out: Path):
    import datasets
    from trl import DPOConfig, DPOTrainer

    pairs, _ = preference_pairs(cfg)
    order = [i for indices in step_indices(cfg, len(pairs)) for i in indices]  # llmsys's order, read sequentially
    rows = [pairs.pair(i) for i in order]
    data = datasets.Dataset.from_dict({"prompt_ids": [p.tolist() for p, _, _ in rows],
                                       "chosen_ids": [c.tolist() for _, c, _ in rows],
                                       "rejected_ids": [r.tolist() for _, _, r in rows]})

    class TokenizedDPO(DPOTrainer):
        """DPOTrainer on pairs already tokenised (llmsys's ids): TRL would re-render and re-tokenise text."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    args = _trl_args(DPOConfig, cfg, out, beta=cfg.dpo.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                     train_sampling_strategy="sequential", max_length=cfg.data.seq_len)
    return _step_timer(TokenizedDPO, lambda inputs: int(inputs["attention_mask"].sum()))(
        model=model, args=args, train_dataset=data, processing_class=tokenizer)


def _trl_grpo(cfg, model, tokenizer, out: Path):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from llmsys.rlhf.rewards.verifiable import exact_answer

    g, prompts = cfg.grpo, grpo_prompts(cfg)
    order = [i for indices in grpo_iteration_prompts(cfg, len(prompts.train)) for i in indices]
    rendered = tokenizer.apply_chat_template(prompts.train_messages[order[0]], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    if list(rendered) != list(prompts.train[order[0]]):
        raise RuntimeError("TRL GRPO: the Hugging Face chat template renders another prompt than llmsys's")
    data = datasets.Dataset.from_dict({"prompt": [prompts.train_messages[i] for i in order],
                                       "answer": [str(prompts.train_meta[i]["answer"]) for i in order]})

    def reward(prompts, completions, answer, **kwargs):  # llmsys's exact-answer check
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return exact_answer([""] * len(texts), texts, [{"answer": a} for a in answer])

    class CountedGRPO(GRPOTrainer):
        """Counts each rollout's prompt + response tokens, responses and generation seconds."""

        def _generate(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                self.count("generation_seconds", time.perf_counter() - t0)

        def _generate_and_score_completions(self, *args, **kwargs):
            batch = super()._generate_and_score_completions(*args, **kwargs)
            generated = int(batch["completion_mask"].sum())
            self.count("generated", generated)
            self.count("tokens", int(batch["prompt_mask"].sum()) + generated)
            self.count("samples", int(batch["completion_mask"].shape[0]))
            return batch

    args = _trl_args(GRPOConfig, cfg, out, gradient_accumulation_steps=g.rollout_batch_size // cfg.trainer.micro_batch_size,
                     num_generations=g.group_size, max_completion_length=g.max_new_tokens, temperature=g.temperature,
                     top_p=g.top_p, beta=g.kl_coef, epsilon=g.clip_low, epsilon_high=g.clip_high, loss_type="dapo",
                     num_iterations=g.epochs, shuffle_dataset=False)
    return _step_timer(CountedGRPO, lambda inputs: 0)(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                                      processing_class=tokenizer)


def trl_run(stage: str, cfg, hf_dir: Path, out: Path) -> dict:
    """``cfg.trainer.max_steps`` optimizer steps of ``stage`` through TRL on the Hugging Face conversion ``hf_dir``."""
    model, tokenizer = _hf_model(hf_dir)
    build = {"sft": _trl_sft, "dpo": _trl_dpo, "grpo": _trl_grpo}[stage]
    trainer = build(cfg, model, tokenizer, out)
    trainer.train()
    out_ = {"step_seconds": [s["seconds"] for s in trainer.steps], "step_tokens": [s.get("tokens", 0) for s in trainer.steps],
            "optimizer": f"transformers optim={getattr(trainer.args.optim, 'value', trainer.args.optim)}"}
    if stage == "grpo":
        for key in ("generated", "generation_seconds", "samples"):
            out_[f"step_{key}"] = [s.get(key, 0) for s in trainer.steps]
    return out_


# -- llmsys --------------------------------------------------------------------------------------------


def llmsys_run(stage: str, overrides: list[str], cfg, launcher: Optional[Path]) -> dict:
    """A real ``llmsys.train`` run (or ``python launcher`` with the same overrides); step seconds from its
    metrics.jsonl, real tokens counted by :func:`real_tokens_per_step`."""
    head = [sys.executable, str(launcher)] if launcher else [sys.executable, "-m", "llmsys.train"]
    proc = subprocess.run([*head, *overrides], cwd=REPO, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(head + overrides)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    out = Path(cfg.trainer.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    optimizer = "llmsys Engine (torch.optim.AdamW through DeepSpeed)"
    if stage == "grpo":
        return _llmsys_grpo(cfg, [r for r in rows if "generation_time" in r], optimizer)
    rows = [r for r in rows if "tokens_per_sec" in r]
    counted = [b["tokens"] - a for a, b in zip([0] + [r["tokens"] for r in rows], rows)]
    seconds = [n / r["tokens_per_sec"] for n, r in zip(counted, rows)]
    real = real_tokens_per_step(stage, cfg)
    if len(real) != len(rows) or (stage == "sft" and real != counted):
        raise RuntimeError(f"llmsys {stage}: {len(rows)} steps logged, the token count of its rows disagrees "
                           f"with the benchmark's ({counted[:3]} vs {real[:3]} ...)")
    return {"step_seconds": seconds, "step_tokens": real, "llmsys_counted_tokens": counted, "optimizer": optimizer}


def _llmsys_grpo(cfg, rows: list[dict], optimizer: str) -> dict:
    """A GRPO iteration from its metrics row: generation + scoring + training seconds, its responses, and its
    real tokens (the prompts' tokens, each prompt answered group_size times, plus the generated ones)."""
    g = cfg.grpo
    prompts = grpo_prompts(cfg)
    iterations = list(grpo_iteration_prompts(cfg, len(prompts.train)))
    if len(rows) != len(iterations):
        raise RuntimeError(f"llmsys grpo: {len(rows)} iterations logged, expected {len(iterations)}")
    generated = [round(r["response_length"] * g.rollout_batch_size) for r in rows]
    prompt_tokens = [g.group_size * sum(len(prompts.train[i]) for i in indices) for indices in iterations]
    return {"step_seconds": [r["generation_time"] + r["score_time"] + r["train_time"] for r in rows],
            "step_tokens": [p + n for p, n in zip(prompt_tokens, generated)], "step_generated": generated,
            "step_generation_seconds": [r["generation_time"] for r in rows],
            "step_samples": [g.rollout_batch_size] * len(rows), "optimizer": optimizer}


# -- measurements and rounds ------------------------------------------------------------------------


def _env() -> dict[str, str]:
    """Every side on the CPU, like llmsys's CI (this benchmark measures the CPU gap)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def measure(impl: str, stage: str, shape: Shape, base: Path, work: Path, steps: int,
            variants: Mapping[str, Path]) -> dict:
    """One fresh-process run of ``impl`` on ``stage``: its per-step seconds and real tokens."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{impl.replace(':', '-')}-{stage}-", dir=work))
    overrides = llmsys_overrides(stage, shape, base, steps, run_dir / "run")
    try:
        if impl == "llmsys" or impl.startswith("llmsys:"):
            launcher = variants[impl.split(":", 1)[1]] if ":" in impl else None
            return llmsys_run(stage, overrides, compose(overrides), launcher)
        spec = {"impl": impl, "stage": stage, "overrides": overrides, "hf_dir": str(work / "hf"),
                "out": str(run_dir / "trl"), "result": str(run_dir / "result.json")}
        (run_dir / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir / "spec.json")]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} {stage}: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
        result = json.loads((run_dir / "result.json").read_text())
        # The same work: the plain loop, and TRL's DPO, visit llmsys's very rows/pairs (TRL's SFT packs its own,
        # GRPO's responses are sampled).
        if (impl == "plain" or stage == "dpo") and result["step_tokens"] != real_tokens_per_step(stage, compose(overrides)):
            raise RuntimeError(f"{impl} {stage}: its steps' tokens {result['step_tokens'][:4]}... differ from "
                               f"llmsys's rows; it did not run the same work")
        return result
    finally:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def _worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    cfg = compose(spec["overrides"])
    if spec["impl"] == "plain":
        result = plain_run(spec["stage"], cfg)
    else:
        result = trl_run(spec["stage"], cfg, Path(spec["hf_dir"]), Path(spec["out"]))
    result["threads"] = torch.get_num_threads()
    Path(spec["result"]).write_text(json.dumps(result))


def summarise(result: dict, warmup: int) -> dict:
    """tokens/s over the steps after ``warmup`` (sum of tokens / sum of seconds), and what it came from; GRPO also
    responses/s and generated tokens per second of generation."""
    seconds, tokens = result["step_seconds"][warmup:], result["step_tokens"][warmup:]
    if not seconds:
        raise RuntimeError(f"no steps after the {warmup} warm-up steps; raise --steps")
    row = {"tokens_per_sec": sum(tokens) / sum(seconds), "steps_timed": len(seconds),
           "tokens_timed": sum(tokens), "seconds_timed": sum(seconds),
           "step_seconds_median": statistics.median(seconds), "optimizer": result.get("optimizer")}
    if "step_samples" in result:
        generation = sum(result["step_generation_seconds"][warmup:])
        row.update(samples_per_sec=sum(result["step_samples"][warmup:]) / sum(seconds),
                   generated_tokens_per_generation_sec=sum(result["step_generated"][warmup:]) / generation,
                   generation_share=generation / sum(seconds))
    for key in ("phase_seconds", "threads"):
        if key in result:
            row[key] = result[key]
    if "llmsys_counted_tokens" in result:
        row["llmsys_counted_tokens"] = sum(result["llmsys_counted_tokens"][warmup:])
    return row


def available(impls: Sequence[str], log: Callable[[str], None]) -> list[str]:
    import importlib.util

    if "trl" in impls and importlib.util.find_spec("trl") is None:
        log("trl is not installed (pip install trl): measuring without it")
        return [i for i in impls if i != "trl"]
    return list(impls)


def run_peers(stages: Sequence[str] = STAGES, impls: Sequence[str] = PEERS, *, rounds: int = 3, steps: int = 20,
              warmup: int = 4, shape: Shape = ISSUE_SHAPE, work_dir: Optional[Path] = None,
              variants: Optional[Mapping[str, Path]] = None, log: Callable[[str], None] = print) -> list[dict]:
    """The measurements of the module docstring; JSON-able rows (unstamped): ``kind`` "round" and "median"."""
    variants = dict(variants or {})
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    impls = available([*impls, *(f"llmsys:{name}" for name in variants if f"llmsys:{name}" not in impls)], log)
    unknown = [i for i in impls if i not in PEERS and not (i.startswith("llmsys:") and i[7:] in variants)]
    if unknown:
        raise ValueError(f"unknown implementation {unknown[0]!r}; choose from {', '.join(PEERS)} (or --variant)")
    if steps <= warmup:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}")
    with tempfile.TemporaryDirectory(prefix="peers-", dir=work_dir) as tmp:
        work = Path(tmp)
        base = prepare(work, shape, with_hf="trl" in impls)
        rows: list[dict] = []
        for r in range(rounds):
            order = impls[r % len(impls):] + impls[:r % len(impls)]  # rotate so no side always runs first
            for stage in stages:
                found = {}
                for impl in order:
                    if impl == "plain" and stage not in PLAIN_STAGES:
                        continue
                    started = time.perf_counter()
                    found[impl] = summarise(measure(impl, stage, shape, base, work, steps, variants), warmup)
                    log(f"round {r + 1}/{rounds} {stage:>4} {impl:>12}: {found[impl]['tokens_per_sec']:9.1f} tok/s "
                        f"({time.perf_counter() - started:.0f} s)")
                for impl in found:
                    row = {"kind": "round", "round": r, "stage": stage, "impl": impl, **found[impl]}
                    for peer in found:
                        if peer != impl:
                            row[f"ratio_vs_{peer}"] = found[impl]["tokens_per_sec"] / found[peer]["tokens_per_sec"]
                    rows.append(row)
    for stage in stages:
        for impl in impls:
            mine = [row for row in rows if row["kind"] == "round" and row["stage"] == stage and row["impl"] == impl]
            if not mine:
                continue
            median = {"kind": "median", "stage": stage, "impl": impl, "rounds": len(mine),
                      "tokens_per_sec": statistics.median(row["tokens_per_sec"] for row in mine)}
            if "samples_per_sec" in mine[0]:
                median["samples_per_sec"] = statistics.median(row["samples_per_sec"] for row in mine)
            for key in sorted({k for row in mine for k in row if k.startswith("ratio_vs_")}):
                values = [row[key] for row in mine]
                median[key], median[f"{key}_range"] = statistics.median(values), [min(values), max(values)]
            rows.append(median)
    setup = {"shape": dataclasses.asdict(shape), "steps": steps, "warmup": warmup,
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return [{**row, **setup} for row in rows]


def targets(rows: list[dict]) -> list[dict]:
    from benchmarks.common import verdict

    out = []
    for (stage, ours, theirs), need in TARGETS.items():
        got = next((row.get(f"ratio_vs_{theirs}") for row in rows
                    if row["kind"] == "median" and row["stage"] == stage and row["impl"] == ours), None)
        out.append(verdict(f"{stage} {ours} tokens/s >= {need}x {theirs} (median of rounds)", got, need, True))
    return out


def plot(rows: list[dict], path: Path) -> None:
    from benchmarks.common import pyplot

    plt = pyplot()
    if plt is None:
        return
    medians = [row for row in rows if row["kind"] == "median"]
    stages = list(dict.fromkeys(row["stage"] for row in medians))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        mine = [r for r in medians if r["stage"] == stage]
        impls = [r["impl"] for r in mine]
        ax.bar(impls, [r["tokens_per_sec"] for r in mine],
               color=["#888888" if i == "plain" else "#1f77b4" if i.startswith("llmsys") else "#ff7f0e" for i in impls])
        ax.set_title(f"{stage}: real tokens/s, median of {mine[0]['rounds']} rounds", fontsize=10)
        ax.set_ylabel("tokens/s")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    p.add_argument("--impls", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (one micro-batch each)")
    p.add_argument("--warmup", type=int, default=4, help="first steps of each run left out of tokens/s")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=LAUNCHER",
                   help="also run llmsys through `python LAUNCHER <overrides>`, reported as llmsys:NAME")
    p.add_argument("--smoke", action="store_true", help="a tiny shape, one round of 4 steps (CI)")
    p.add_argument("--work-dir", type=Path, default=None, help="parent of the temporary work directory")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT, else benchmarks/results/")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.worker is not None:
        return _worker(args.worker)

    from benchmarks.common import Results, default_out_dir, print_table, stamp

    variants = {}
    for item in args.variant:
        name, sep, launcher = item.partition("=")
        if not sep or not name or not Path(launcher).is_file():
            p.error(f"--variant {item!r}: expected NAME=LAUNCHER with an existing launcher file")
        variants[name] = Path(launcher).resolve()
    shape = ISSUE_SHAPE
    if args.smoke:
        shape, args.rounds, args.steps, args.warmup = SMOKE_SHAPE, 1, 4, 1
    stamp_ = stamp(torch.device("cpu"), optional=("deepspeed", "transformers", "trl"))
    results = Results("peers", stamp_, args.out or default_out_dir(), args.smoke)
    try:
        rows = run_peers([s for s in args.stages.split(",") if s], [i for i in args.impls.split(",") if i],
                         rounds=args.rounds, steps=args.steps, warmup=args.warmup, shape=shape,
                         work_dir=args.work_dir, variants=variants)
    except ValueError as err:
        p.error(str(err))
    for row in rows:
        results.add(row)
    medians = [row for row in results.rows if row["kind"] == "median"]
    ratio_keys = sorted({k for row in medians for k in row if k.startswith("ratio_vs_") and not k.endswith("_range")})
    print_table(medians, [("stage", "stage", ""), ("impl", "impl", ""), ("tokens/s", "tokens_per_sec", ".1f"),
                          ("samples/s", "samples_per_sec", ".1f"),
                          *((k.replace("ratio_", "x "), k, ".3f") for k in ratio_keys)])
    checks = targets(results.rows)
    for row in results.rows:
        if row["kind"] == "median" and row["impl"] == "llmsys":
            row["targets"] = [c for c in checks if c["target"].startswith(row["stage"])]
    results.save()
    plot(results.rows, results.png_path)
    print(f"wrote {results.json_path}")


if __name__ == "__main__":
    main()
