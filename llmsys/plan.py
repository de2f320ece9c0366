"""``python -m llmsys.plan <the overrides of a run> --devices N --device-memory 80GB [--json]``: will it fit?

Before anything is launched, the planner composes the run's config as ``python -m llmsys.train`` does (the
same Hydra tree, schema checks and one-line errors) and prints the memory one device will hold, part by
part and phase by phase, whether the peak fits in ``--device-memory`` and, when it does not, the one
setting that would make it fit. Nothing is built, allocated or downloaded: the shapes come from the
config, from the ``config.json`` of ``model.init_from`` (and of PPO's and GRPO's reward model and critic)
and from the tokenizer's size.

**Model states**, per device (``N`` trained parameters, ``W`` devices, ``p`` bytes per weight: 4 fp32,
2 bf16), as DeepSpeed 0.19's optimizers allocate them, read from its code and checked against the allocations
torch's profiler records over training steps on one process (fp32 and bf16: ZeRO 0-2 within 2% in every
phase, ZeRO-3 within 8%, some of its buffers unidentified):

=================  ==========================  ==============================  ===========================
                   ZeRO-0                      ZeRO-1 / ZeRO-2                 ZeRO-3
=================  ==========================  ==============================  ===========================
parameters         p N                         p N                             p N / W, small tensors
                                                                               whole; the gathered ones
                                                                               (up to 1e9 elements)
fp32 master copy   4 N under bf16, else none   4 N / W (a clone, fp32 too)     4 N / W
Adam m and v       8 N                         8 N / W                         8 N / W
gradients          p N; the bf16 step copies   ZeRO-1 p N until reduced,       p N / W, and a resident
                   them to fp32 (4 N)          ZeRO-2 p N / W; 4 N / W fp32    4 N / W fp32 partition
                                               at the step
buffers            a flat copy of the          the reduce bucket,              the reduce bucket,
                   gradients for the           reduce_bucket_size x p, from    resident
                   all-reduce, p N (none on    each backward (through the
                   one rank in fp32)           step on several ranks)
=================  ==========================  ==============================  ===========================

``deepspeed.offload_optimizer`` moves the master copy, Adam's moments and the step's gradient partitions
into host memory (DeepSpeed's CPU Adam steps them there); ``deepspeed.offload_param`` (ZeRO-3) moves the
parameters too. torch's AdamW is fused on every device: it updates the states in place, no temporaries.

**Activations** are the tensors autograd saves for the backward pass, from
:mod:`llmsys.models.transformer` with the chosen kernels (:func:`layer_activation_bytes` lists them;
``tests/test_plan.py`` checks the count byte for byte against the saved tensors of a real block); with
``model.activation_checkpointing`` a block keeps only its input and one block is recomputed at a time. The
output head is counted apart: eager logits take 12 bytes per token and vocabulary entry at their peak (20
for the log-probs and entropy of DPO, PPO and GRPO), the fused kernel one chunk of
``llmsys.kernels.cross_entropy.LOGITS_CHUNK_BYTES`` plus the gradients it keeps from the forward pass.
PPO and GRPO add the frozen models (reference, reward model: a whole copy per device under ZeRO 0-2, a
1/W partition under ZeRO-3, in host memory with ``offload_frozen``), PPO's critic (a second trained
engine), the KV cache and prefill logits of generating a whole rollout at once, and the scoring passes.
Where the data decides, the planner takes the bound: sequences of ``data.seq_len``, SFT micro-batches
packed full, responses of ``max_new_tokens``, prompts of ``data.seq_len - max_new_tokens``.

**The peak** is the resident parts plus the largest phase: start-up (the weights read from
``model.init_from``, DeepSpeed's flattening), forward/backward (activations, the bucket), gradient
reduction, the optimizer step, generation and scoring, and the export (rank 0 copies the weights into
host memory). On a GPU that is what ``torch.cuda.max_memory_allocated`` would report; the CUDA context and
the allocator's fragmentation come on top, so a plan "fits" only with :data:`HEADROOM` of the device left
free. No GPU has checked these numbers yet (none was lent while this was written).

**On the CPU** (``--device cpu``: a run on gloo processes) the device memory is each process's RSS. The
planner adds the measured RSS of a training process of a tiny model (:data:`CPU_PROCESS_BASELINE`:
Python, torch, DeepSpeed with its CPU communication op, Hydra, datasets, the gloo group, torch.optim's lazy
imports), counts a buffer allocated but never filled (the reduce bucket) only as far as it is written, and
keeps the activations in every phase after the backward: glibc keeps the blocks they are freed into, and
the large buffers that follow are mapped anew, so the RSS adds them up. Checked against the peak RSS
(VmHWM) of real runs of a 78M-parameter model, pre-training and SFT, ZeRO 0 and 2, on 1 and 2 gloo
processes, fp32 and bf16, with and without checkpointing: every rank's peak within -7.8% / +8.8% of the
plan (34 ranks of 24 runs, 2 loaded cores); ``tests/test_plan.py`` asserts :data:`RSS_TOLERANCE`, ±15%.

Not counted: evaluation passes and DPO's reference log-probs before training (no-grad forwards, smaller
than a training step), checkpoint writes (DeepSpeed writes from the tensors it holds), data loading
beyond what the baseline's embedded corpora take, pipeline/tensor parallelism (llmsys has none).

**Step time**: from the benchmark tables (``benchmarks/results/*.json``, rows of ``train_throughput.py``
and ``stages.py``) when one was measured on the device at this shape (:func:`expected_step`), else the
planner says there is none.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from llmsys.config import (
    Config,
    ConfigError,
    DeepSpeedConfig,
    LoRAConfig,
    ModelConfig,
    composition_error,
    config_dir,
    register,
    to_config,
    unknown_override_error,
)
from llmsys.models import resolve_vocab_size
from llmsys.models.transformer import PACKED_CHUNK_TOKENS

# Peak RSS of a `python -m llmsys.train` process whose model is negligible (0.1M parameters, 3 steps of
# 2 x 256 tokens): the interpreter, torch, DeepSpeed and its CPU communication op, Hydra, datasets,
# tokenizers, the gloo group, torch.optim's lazy imports (~140 MB the first optimizer pulls in). Measured
# with torch 2.13 CPU, DeepSpeed 0.19.8, Python 3.11 on 1 and 2 processes (the same per rank): 538 MiB
# under ZeRO-0, 580 MiB under ZeRO 1-2 (DeepSpeed's ZeRO optimizer imports more). tests/test_plan.py
# measures the first again beside the large runs.
CPU_PROCESS_BASELINE = {0: 540 * 2**20, 1: 582 * 2**20}  # key: min(ZeRO stage, 1)
# How far the measured peak RSS of a CPU run may be from the plan (tests/test_plan.py asserts it): the worst
# seen was +8.8% / -7.8% (34 ranks of 24 runs on 2 loaded cores); the margin is for other machines' allocators.
RSS_TOLERANCE = 0.15
# The part of --device-memory a plan leaves free for what it does not model (CUDA context, allocator
# fragmentation): a run "fits" when its peak is at most 1 - HEADROOM of the device, is "tight" up to all of it.
HEADROOM = 0.10
# DeepSpeed's defaults for the settings llmsys does not expose (deepspeed/runtime/zero/config.py).
DS_ALLREDUCE_BUCKET = 500_000_000  # elements per all-reduce of ZeRO-0's flattened gradients
DS_MAX_LIVE_PARAMETERS = 1_000_000_000  # ZeRO-3 stage3_max_live_parameters: gathered elements kept
GB = 10**9
BENCHMARK_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"  # of a source checkout


class PlanError(ValueError):
    """A run the planner cannot plan (a missing or unreadable checkpoint, an impossible batch); one line."""


# -- sizes ------------------------------------------------------------------------------------------


def parse_bytes(text: str) -> int:
    """'80GB' -> 80e9, '80GiB' -> 80 * 2**30, '512MB', '1.5TB', '1024' (bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 80GB, 80GiB or 512MB")
    value, unit = float(match.group(1)), match.group(2).rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}.get(unit)
    if scale is None:
        raise ValueError(f"{text!r}: unknown unit; use B, KB, MB, GB, TB or KiB, MiB, GiB, TiB")
    return int(value * scale)


def gb(n: float) -> str:
    return f"{n / GB:.3f}" if n < 10 * GB else f"{n / GB:.1f}"


# -- the model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What one model holds: its config and kind, its parameter elements, the trained ones, the largest
    tensor (torch's CPU AdamW steps tensor by tensor) and the elements in small tensors (ZeRO-3 keeps a
    tensor below ``deepspeed.stage3_param_persistence_threshold`` whole on every rank)."""

    cfg: ModelConfig
    kind: str  # "lm" (Transformer) or "scalar" (ScalarHeadModel: reward model, critic)
    params: int
    trained: int
    largest: int
    small: int


def parameter_tensors(cfg: ModelConfig, kind: str, lora: bool) -> list[tuple[int, bool]]:
    """(elements, trained) of every parameter tensor of a ``Transformer`` (``kind="lm"``) or a
    ``ScalarHeadModel`` (``"scalar"``), with ``cfg.lora``'s adapters when ``lora`` (then only they train,
    and a scalar model's head), as :mod:`llmsys.models.transformer` builds them."""
    d, q, kv, h, V = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.vocab_size
    lora = lora and cfg.lora.rank > 0
    base = not lora
    projections = {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, h), "w3": (d, h), "w2": (h, d)}
    layer = [(i * o, base) for i, o in projections.values()] + [(d, base), (d, base)]
    if cfg.qkv_bias:
        layer += [(q, base), (kv, base), (kv, base)]
    if lora:
        layer += [(cfg.lora.rank * side, True) for target in cfg.lora.targets for side in projections[target]]
    tensors = [(V * d, base)] + layer * cfg.n_layers + [(d, base)]
    if kind == "lm" and not cfg.tie_embeddings:
        tensors.append((V * d, base))
    if kind == "scalar":
        tensors += [(d, True), (1, True)]
    return tensors


def model_shape(cfg: ModelConfig, kind: str, *, lora: bool, persistence_threshold: int) -> ModelShape:
    """The counts of a ``Transformer`` or ``ScalarHeadModel`` (see :func:`parameter_tensors`)."""
    tensors = parameter_tensors(cfg, kind, lora)
    return ModelShape(cfg, kind, params=sum(n for n, _ in tensors), trained=sum(n for n, trained in tensors if trained),
                      largest=max(n for n, _ in tensors),
                      small=sum(n for n, _ in tensors if n < persistence_threshold))


def weight_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


# -- activations --------------------------------------------------------------------------------------


def layer_activation_bytes(cfg: ModelConfig, e: int, tokens: int, packed_len: int = 0) -> int:
    """Bytes one decoder block saves for its backward pass over ``tokens`` tokens, its weights in ``e``-byte
    floats; ``packed_len`` is the length of the masked chunks SDPA attends over in a packed row
    (``Packing.chunks``), 0 when the attention takes no mask.

    Per token, from :class:`llmsys.models.transformer.Block` with torch's kernels (the fused ones save less,
    as noted):

    - each of the two RMSNorms: its input in fp32 (the input itself under fp32, a ``.float()`` copy under
      bf16), the normalised value before the weight (``e``), 1/rms (4); the fused norm keeps its input (``e``)
      and 1/rms only;
    - the projections' inputs: the normed attention input (shared by wq, wk, wv), the attention output
      (wo), the normed MLP input (w1, w3): ``e * (2 dim + heads * head_dim)``;
    - attention: the rotated queries and keys and the values (``e * (q + 2 kv)``; rotary embedding saves only
      its cos/sin tables), the output (counted above) and the fp32 log-sum-exp per head (4 per head),
      alike for SDPA's flash kernels, llmsys's Triton kernel and flash-attn; a packed row under SDPA adds
      each chunk's (L, L) mask, which SDPA converts to the activations' dtype (``e * L`` per token), and
      when the row is longer than one chunk the chunks' outputs joined into one (``e * heads * head_dim``);
    - SwiGLU: w1's and w3's outputs, silu's output and the product: ``4 e ffn`` (the fused kernel: ``3 e ffn``);
    - LoRA: each adapted projection keeps its rank-``r`` intermediate (``e r``), and with dropout the dropped
      input (``e in``) and its mask (1 byte each).
    """
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    if cfg.norm == "fused":
        norms = 2 * (e * d + 4)
    else:
        norms = 2 * (4 * d + e * d + 4)
    projections = e * (2 * d + q)
    attention = e * (q + 2 * kv) + 4 * cfg.n_heads
    mlp = (3 if cfg.mlp == "fused" else 4) * e * f
    lora = 0
    if cfg.lora.rank:
        inputs = {"wq": d, "wk": d, "wv": d, "wo": q, "w1": d, "w3": d, "w2": f}
        for target in cfg.lora.targets:
            lora += e * cfg.lora.rank + ((e + 1) * inputs[target] if cfg.lora.dropout > 0 else 0)
    packed = 0
    if packed_len and cfg.attention == "sdpa":
        packed = e * packed_len + (e * q if tokens > packed_len else 0)
    return tokens * (norms + projections + attention + mlp + lora + packed)


def layer_inference_bytes(cfg: ModelConfig, e: int, tokens: int) -> int:
    """The most one block holds at once in a no-grad forward (generation's prefill, scoring): its input,
    residual and normed stream, the queries, keys, values and attention output, and three ffn-sized
    tensors of SwiGLU (an upper bound: they are not all alive together)."""
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    return tokens * e * (3 * d + 2 * q + 2 * kv + 3 * f)


def layer_backward_bytes(cfg: ModelConfig, e: int, tokens: int) -> int:
    """Transient gradients while one block runs its backward beyond what it saved: about three dim-sized
    tensors per token (the gradients at its input, output and residual; measured with torch's profiler)."""
    return tokens * e * 3 * cfg.dim


@dataclass(frozen=True)
class Micro:
    """One micro-batch of a training forward: ``rows`` sequences of ``length`` tokens (``packed``: one row
    of several sequences with their boundaries), through an LM loss, log-probs, or a scalar head."""

    rows: int
    length: int
    packed: bool
    head: str  # "loss" (next-token CE), "logprobs" (per-token log-probs and entropy), "scalar"
    chunk: int = 0  # packed: the longest run of whole sequences one SDPA call attends over (a bound)

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def head_bytes(cfg: ModelConfig, e: int, tokens: int, head: str, training: bool = True) -> tuple[int, str]:
    """Peak bytes of the output head over ``tokens`` tokens beyond the trunk's activations, and how."""
    V, d = cfg.vocab_size, cfg.dim
    if head == "scalar":
        return tokens * 8, "scalar head: fp32 values"
    if cfg.loss == "fused":
        from llmsys.kernels import cross_entropy as ce

        rows = max(1, ce.LOGITS_CHUNK_BYTES // (V * e))
        if rows >= ce.CHUNK_ROW_MULTIPLE:
            rows -= rows % ce.CHUNK_ROW_MULTIPLE
        rows = min(rows, tokens)
        chunk = rows * V * e
        if not training:
            return chunk, f"fused kernel: one chunk of {rows} x {V} logits"
        grads = tokens * d * e + V * d * e
        acc = V * d * 4 if e < 4 and tokens > rows and ce.ACCUMULATE_GRAD_WEIGHT_FP32 else 0
        if head == "logprobs":  # the backward recomputes each chunk beside its gradient
            return 2 * chunk + grads + acc, (f"fused kernel: a chunk of {rows} x {V} logits and its gradient, "
                                             f"the head's gradients{' and their fp32 accumulator' if acc else ''}")
        return chunk + grads + acc, (f"fused kernel: one chunk of {rows} x {V} logits, the head's gradients "
                                     f"kept from the forward{' and their fp32 accumulator' if acc else ''}")
    per = {("loss", True): 12, ("logprobs", True): 20, ("loss", False): 8, ("logprobs", False): 12}[head, training]
    what = "their log-softmax and its gradient" if training else "their fp32 log-softmax"
    return tokens * V * per, f"eager: {tokens} x {V} logits, {what}"


def activation_bytes(cfg: ModelConfig, e: int, micro: Micro, checkpointing: bool) -> dict[str, int]:
    """The activation memory of one training micro-batch: per part, bytes (see the module docstring)."""
    tokens = micro.tokens
    packed_len = micro.chunk if micro.packed else 0
    layer = layer_activation_bytes(cfg, e, tokens, packed_len)
    d = cfg.dim
    final_norm = tokens * ((e * d + 4) if cfg.norm == "fused" else (4 * d + e * d + 4))
    outside = final_norm + tokens * e * d + tokens * 8  # the head's input, the token ids (embedding backward)
    if micro.packed:
        outside += tokens * 4 * cfg.head_dim  # cos/sin gathered at each token's position
        if cfg.attention == "sdpa":
            outside += tokens * packed_len  # the chunks' boolean masks, built once per forward
    head, _ = head_bytes(cfg, e, tokens, micro.head)
    backward = layer_backward_bytes(cfg, e, tokens)
    if checkpointing:
        kept = cfg.n_layers * tokens * e * d
        recompute = layer
    else:
        kept = cfg.n_layers * layer
        recompute = 0
    return {"layers": kept, "recomputed layer": recompute, "outside the layers": outside, "head": head,
            "backward transient": backward}


def activation_peak(parts: dict[str, int]) -> int:
    """Saved activations plus the largest transient: the head's (end of forward, start of backward) or one
    block's backward (with its recomputation under checkpointing)."""
    return (parts["layers"] + parts["outside the layers"]
            + max(parts["head"], parts["recomputed layer"] + parts["backward transient"]))


# -- memory parts and phases ------------------------------------------------------------------------------

RESIDENT = "resident"
PHASES = ("start-up", "forward/backward", "gradient reduction", "optimizer step", "generation", "scoring", "export")


@dataclass(frozen=True)
class Part:
    """Bytes one thing takes on one device (or in its host's memory) during one phase of the run;
    ``resident`` parts stay for the whole run."""

    name: str
    bytes: int
    phase: str = RESIDENT
    host: bool = False  # in host memory (offloaded, or a CPU-side copy) rather than on the device
    after_start: bool = False  # created by the first optimizer step (Adam's moments): not there at start-up
    activation: bool = False  # a training forward/backward's activations (kept in a CPU process's heap after it)


@dataclass(frozen=True)
class Target:
    """Where the run goes: ``kind`` cuda or cpu (then device memory is the host's), ``world`` devices."""

    kind: str
    world: int

    @property
    def cpu(self) -> bool:
        return self.kind == "cpu"


def engine_phase(phase: str, label: str) -> str:
    """A phase of one trained engine: its own when a stage trains two (PPO's actor and critic take turns)."""
    return phase if label == MODEL else f"{phase} ({label})"


MODEL = "model"  # the label of a stage's one trained model


def engine_parts(label: str, shape: ModelShape, ds: DeepSpeedConfig, precision: str, target: Target,
                 online: bool = False) -> list[Part]:
    """Parameters, gradients, optimizer states and DeepSpeed's buffers of one trained DeepSpeed engine
    (:class:`llmsys.distributed.Engine`), per device: the table of the module docstring. ``online``: the
    engine also generates and scores (PPO, GRPO), which gathers its ZeRO-3 parameters too."""
    p, W, n, t, z = weight_bytes(precision), target.world, shape.trained, shape.params, ds.stage
    off_opt, off_param = ds.offload_optimizer, ds.offload_param
    dtype = "bf16" if p == 2 else "fp32"
    # On the CPU an allocation counts in the RSS only where it is written: the bucket fills with the gradients.
    copies = 2 if ds.overlap_comm else 1
    bucket = (min(ds.reduce_bucket_size, n) if target.cpu else ds.reduce_bucket_size) * p * copies
    bucket_name = (f"reduce bucket (deepspeed.reduce_bucket_size x {dtype}{' x 2, overlap_comm' if copies == 2 else ''}"
                   f"{', the written part' if target.cpu else ''}")
    parts: list[Part] = []

    def add(name: str, size: int, phase: str = RESIDENT, **kw: Any) -> None:
        if phase not in (RESIDENT, "start-up", "generation", "scoring"):
            phase = engine_phase(phase, label)
        parts.append(Part(f"{label}: {name}", size, phase, **kw))

    if z < 3:
        add(f"parameters ({dtype}, whole on every device)", p * t)
    else:
        add(f"parameters ({dtype}, ZeRO-3: 1/{W}, small tensors whole)", zero3_share(shape, p, W), host=off_param)
        gathered = p * min(t if off_param else t - t // W, DS_MAX_LIVE_PARAMETERS)
        for phase in ("forward/backward", "gradient reduction") + (("generation", "scoring") if online else ()):
            add("ZeRO-3 gathered parameters (up to stage3_max_live_parameters)", gathered, phase)
    share = 1 if z == 0 else W
    if z > 0 or p == 2:
        add(f"fp32 master weights{f' (1/{W})' if z else ''}", 4 * n // share, host=off_opt)
    # DeepSpeed's bf16 ZeRO-0 optimizer runs one step at start-up to create them; elsewhere the first step does.
    add(f"Adam m and v (fp32{f', 1/{W}' if z else ''})", 8 * n // share, host=off_opt,
        after_start=not (z == 0 and p == 2))
    if z == 0:
        add(f"gradients ({dtype})", p * n, "gradient reduction")
        if W > 1 or p == 2:  # the Engine turns DeepSpeed's all-reduce off on one fp32 rank
            add("flat copy of the gradients for the all-reduce", p * min(n, DS_ALLREDUCE_BUCKET),
                "gradient reduction")
        add(f"gradients ({dtype})", p * n, "optimizer step")
        if p == 2:
            add("fp32 copies of the gradients for the step", 4 * n, "optimizer step")
            add("zero gradients (fp32, bf16) of the step DeepSpeed runs at start-up", 6 * n, "start-up")
    elif z < 3:
        # Allocated as each backward starts (the previous one dropped then); with several ranks still held
        # through the optimizer step (measured on gloo; one rank frees it when its backward ends).
        for phase in ("forward/backward", "gradient reduction") + (("optimizer step",) if W > 1 else ()):
            add(bucket_name + ")", bucket, phase)
        whole = z == 1
        add(f"gradients ({dtype}, {'whole until reduced' if whole else f'1/{W}'})", p * n // (1 if whole else W),
            "gradient reduction")
        add(f"gradient partition ({dtype}, 1/{W})", p * n // W, "optimizer step", host=off_opt)
        add(f"fp32 gradient partition for the step (1/{W})", 4 * n // W, "optimizer step", host=off_opt)
        add("flattened parameters (start-up copy)", p * t, "start-up")
        if target.cpu and W > 1:
            # Measured, mechanism not pinned down: on gloo CPU processes every rank holds about one more flat
            # copy of the weights through the step (presumably the all-gather of the updated partitions).
            add("flat weights for the all-gather of the step (gloo, measured)", p * n, "optimizer step")
        if off_opt:
            add(f"{dtype} parameter buffer of the CPU optimizer (1/{W})", p * n // W, host=True)
    else:
        add(bucket_name + ", resident under ZeRO-3)", bucket)
        add(f"fp32 gradient partition (1/{W})", 4 * n // W, host=off_opt)
        add(f"gradient partition ({dtype}, 1/{W})", p * n // W, "gradient reduction")
        add(f"fp32 gradient copy for the step (1/{W})", 4 * n // W, "optimizer step", host=off_opt)
    return parts


def zero3_share(shape: ModelShape, p: int, world: int) -> int:
    """Bytes of a ZeRO-3 rank's parameters: 1/W of each tensor, the small ones whole."""
    return p * (shape.params // world + shape.small * (world - 1) // world)


def frozen_parts(label: str, shape: ModelShape, ds: DeepSpeedConfig, precision: str, target: Target,
                 offload: bool) -> list[Part]:
    """A model that is only evaluated (:class:`llmsys.distributed.FrozenModel`): a whole copy in the
    weights' dtype under ZeRO 0-2, a 1/W partition under ZeRO-3; in host memory with ``offload``."""
    p, W, t = weight_bytes(precision), target.world, shape.params
    dtype = "bf16" if p == 2 else "fp32"
    if ds.stage < 3:
        return [Part(f"{label}: parameters ({dtype}, frozen{', in host memory' if offload else ''})", p * t,
                     host=offload)]
    parts = [Part(f"{label}: parameters ({dtype}, frozen, ZeRO-3: 1/{W})", zero3_share(shape, p, W), host=offload)]
    for phase in ("generation", "scoring"):
        parts.append(Part(f"{label}: ZeRO-3 gathered parameters", p * min(t - t // W, DS_MAX_LIVE_PARAMETERS), phase))
    return parts


def training_parts(label: str, shape: ModelShape, micro: Micro, precision: str) -> tuple[list[Part], dict]:
    """The activations of one training micro-batch (phase forward/backward) and their breakdown."""
    cfg, e = shape.cfg, weight_bytes(precision)
    parts = activation_bytes(cfg, e, micro, cfg.activation_checkpointing)
    other = activation_bytes(cfg, e, micro, not cfg.activation_checkpointing)
    _, how = head_bytes(cfg, e, micro.tokens, micro.head)
    shape_text = f"{micro.rows} x {micro.length} tokens{' packed' if micro.packed else ''}"
    ckpt = "with" if cfg.activation_checkpointing else "without"
    phase = engine_phase("forward/backward", label)
    recompute = parts["recomputed layer"] + parts["backward transient"]
    if parts["head"] >= recompute:
        transient = Part(f"{label}: output head ({how})", parts["head"], phase)
    else:
        what = "recomputing one block and its backward" if cfg.activation_checkpointing else "one block's backward"
        transient = Part(f"{label}: {what} (above the head's {gb(parts['head'])} GB)", recompute, phase)
    out = [Part(f"{label}: activations saved by {cfg.n_layers} blocks ({shape_text}, {ckpt} checkpointing)",
                parts["layers"], phase, activation=True),
           Part(f"{label}: activations outside the blocks (final norm, the head's input)", parts["outside the layers"],
                phase, activation=True),
           dataclasses.replace(transient, activation=True)]
    info = {"with_checkpointing" if cfg.activation_checkpointing else "without_checkpointing": activation_peak(parts),
            "without_checkpointing" if cfg.activation_checkpointing else "with_checkpointing": activation_peak(other),
            "per_block": layer_activation_bytes(cfg, e, micro.tokens, micro.chunk if micro.packed else 0)}
    return [part for part in out if part.bytes], info


def generation_parts(label: str, shape: ModelShape, rows: int, prompt: int, new: int, precision: str) -> list[Part]:
    """Sampling ``rows`` responses at once (:func:`llmsys.models.generation.generate`): the KV cache of
    every block, the prefill's logits at every prompt position, and one block's intermediates in the prefill."""
    cfg, e = shape.cfg, weight_bytes(precision)
    total = prompt + new
    cache = 2 * cfg.n_layers * rows * total * cfg.kv_heads * cfg.head_dim * e
    logits = rows * prompt * cfg.vocab_size * e
    mask = rows * prompt * total
    block = layer_inference_bytes(cfg, e, rows * prompt)
    return [Part(f"{label}: KV cache ({rows} sequences x {total} positions x {cfg.n_layers} blocks)", cache,
                 "generation"),
            Part(f"{label}: prefill logits ({rows} x {prompt} x {cfg.vocab_size})", logits, "generation"),
            Part(f"{label}: prefill intermediates of one block and the attention mask", block + mask, "generation")]


def scoring_parts(label: str, shape: ModelShape, micro: Micro, precision: str) -> list[Part]:
    """One no-grad forward of a micro-batch (log-probs or values of the rollout): the head's transients."""
    e = weight_bytes(precision)
    head, _ = head_bytes(shape.cfg, e, micro.tokens, micro.head, training=False)
    return [Part(f"{label}: scoring forward (no grad: one block and the head)",
                 head + layer_inference_bytes(shape.cfg, e, micro.tokens), "scoring")]


# -- one run ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """The memory of one run, per device, and what it was computed from."""

    stage: str
    target: Target
    summary: str
    parts: list[Part]
    activations: dict[str, dict[str, int]]  # per trained model: with/without checkpointing, per block
    params: int  # parameters of the trained model (PPO/GRPO: the actor)
    notes: list[str] = field(default_factory=list)

    def _counted(self, part: Part, host: bool) -> bool:
        """On a GPU the device holds the non-host parts; on the CPU the process holds them all."""
        return True if self.target.cpu else part.host == host

    def peak(self, host: bool = False) -> tuple[int, str]:
        """(bytes, phase) of the device's (``host``: the host process's) largest total over the phases."""
        totals = self.phase_totals(host)
        where = max(totals, key=lambda phase: totals[phase])
        return totals[where], where

    @staticmethod
    def _phase_order(phase: str) -> tuple[int, str]:
        base = phase.split(" (")[0]
        return (PHASES.index(base) if base in PHASES else len(PHASES), phase)

    def phase_totals(self, host: bool = False) -> dict[str, int]:
        """Bytes held in each phase: the resident parts plus the phase's own. On the CPU the activations of
        the training forward/backward stay in the process's RSS through every later phase: glibc keeps the
        freed blocks in its heap and the large buffers that follow (gradient copies, optimizer temporaries)
        are mapped anew, so they add up (measured, see the module docstring)."""
        resident = [p for p in self.parts if p.phase == RESIDENT and self._counted(p, host)]
        out = {RESIDENT: sum(p.bytes for p in resident)}
        retained = 0
        if self.target.cpu:
            retained = max((sum(p.bytes for p in self.parts if p.phase == phase and p.activation)
                            for phase in {p.phase for p in self.parts}), default=0)
        for phase in sorted({p.phase for p in self.parts if p.phase != RESIDENT}, key=self._phase_order):
            base = sum(p.bytes for p in resident if not (phase == "start-up" and p.after_start))
            own = [p for p in self.parts if p.phase == phase and self._counted(p, host)]
            kept = 0 if phase == "start-up" or any(p.activation for p in own) else retained
            out[phase] = base + kept + sum(p.bytes for p in own)
        return out


def _tokenizer_size(path: Path) -> Optional[int]:
    """Entries of ``path/tokenizer.json`` (with added tokens), or None when there is none."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)


def _checkpoint_config(path: str, run: ModelConfig, key: str, notes: list[str],
                       instead: str = "the shapes of model.*") -> Optional[ModelConfig]:
    """The architecture saved at ``path`` with ``run``'s kernels, or None (noted) when it is not there yet."""
    from llmsys.models import init_config
    from llmsys.models.gguf import find_gguf
    from llmsys.models.hf import is_hub_name

    local = Path(path).expanduser()
    if not local.exists():
        if is_hub_name(path):
            raise PlanError(f"{key}={path}: a hub name; the planner reads no network, so give the downloaded "
                            f"model directory (or the model's shapes as model.* overrides)")
        notes.append(f"{key}={path} does not exist yet: planned with {instead} instead")
        return None
    if find_gguf(path) is not None:
        raise PlanError(f"{key}={path}: a GGUF file; the planner reads an llmsys export or a Hugging Face directory: "
                        f"give the export the first run converts it into ($LLMSYS_HOME/gguf/<sha256>/model) or "
                        f"`python -m llmsys.models.hf import {path} DST`")
    try:
        return init_config(path, run)
    except (OSError, ValueError) as err:
        raise PlanError(f"{key}={path}: {' '.join(str(err).split())}") from None


def _weights_file_bytes(path: Optional[str], shape: ModelShape) -> int:
    """Bytes of the weights a run reads from ``path`` at start-up: its safetensors files' size (fp32 when
    there are none yet)."""
    folder = Path(path).expanduser() if path else None
    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    return sum(f.stat().st_size for f in files) if files else 4 * shape.params


def resolve_model(config: Config, notes: list[str]) -> ModelConfig:
    """The trained model's config as the run will build it: the checkpoint's architecture (when
    ``model.init_from`` exists), the vocabulary sized from the tokenizer."""
    cfg = config.model
    if cfg.init_from:
        cfg = _checkpoint_config(cfg.init_from, cfg, "model.init_from", notes) or cfg
    if cfg.vocab_size == 0:
        sources = [Path(p).expanduser() for p in (config.model.init_from, config.data.tokenizer) if p]
        size = next((n for n in (_tokenizer_size(p) for p in sources) if n), None)
        if size is None:
            size = config.data.bpe_vocab_size
            notes.append(f"vocabulary: the BPE trained on the data has at most data.bpe_vocab_size={size} entries")
        cfg = dataclasses.replace(cfg, vocab_size=resolve_vocab_size(cfg, size))
    return cfg


def _scalar_model(path: Optional[str], actor: ModelConfig, key: str, notes: list[str]) -> ModelConfig:
    """A reward model's (or critic's) architecture from its export, else the actor's (noted)."""
    if path:
        found = _checkpoint_config(path, dataclasses.replace(actor, lora=LoRAConfig()), key, notes,
                                   instead="the actor's shapes")
        if found is not None:
            return dataclasses.replace(found, lora=LoRAConfig(),
                                       activation_checkpointing=actor.activation_checkpointing)
    return dataclasses.replace(actor, lora=LoRAConfig())


def plan_run(config: Config, target: Target) -> Plan:
    """The per-device memory of ``config`` trained on ``target`` (see the module docstring)."""
    notes: list[str] = []
    stage, tcfg, ds, precision = config.stage.name, config.trainer, config.deepspeed, config.trainer.precision
    W, mb, seq = target.world, tcfg.micro_batch_size, config.data.seq_len
    if tcfg.global_batch_size % (mb * W):
        raise PlanError(f"trainer.global_batch_size={tcfg.global_batch_size} is not divisible by "
                        f"trainer.micro_batch_size * devices = {mb} * {W}; the run would stop at start-up")
    model = resolve_model(config, notes)
    if seq > model.max_seq_len:
        raise PlanError(f"data.seq_len={seq} exceeds the model's max_seq_len={model.max_seq_len}")
    threshold = ds.stage3_param_persistence_threshold
    kind = "scalar" if stage == "reward" else "lm"
    actor = model_shape(model, kind, lora=True, persistence_threshold=threshold)
    online = stage in ("ppo", "grpo")
    label = "actor" if online else MODEL
    parts = engine_parts(label, actor, ds, precision, target, online)
    activations: dict[str, dict[str, int]] = {}
    micro = {"pretrain": Micro(mb, seq, False, "loss"), "sft": Micro(1, mb * seq, True, "loss", min(mb * seq, max(seq, PACKED_CHUNK_TOKENS))),
             "reward": Micro(2 * mb, seq, False, "scalar"), "dpo": Micro(2 * mb, seq, False, "logprobs"),
             "ppo": Micro(mb, seq, False, "logprobs"), "grpo": Micro(mb, seq, False, "logprobs")}[stage]
    trained, activations[label] = training_parts(label, actor, micro, precision)
    parts += trained
    starts = [(model.init_from, actor)] if model.init_from else []
    if online:
        rl = config.ppo if stage == "ppo" else config.grpo
        whole = W * math.lcm(config.grpo.group_size, mb)  # PPO's own check follows from the schema's
        if stage == "grpo" and rl.rollout_batch_size % whole:
            raise PlanError(f"grpo.rollout_batch_size={rl.rollout_batch_size} must be a multiple of {whole} (whole "
                            f"groups and micro-batches on each of {W} devices); the run would stop at start-up")
        rows = rl.rollout_batch_size // W
        prompt = seq - rl.max_new_tokens
        if prompt < 1:
            raise PlanError(f"data.seq_len={seq} must exceed {stage}.max_new_tokens={rl.max_new_tokens}")
        frozen_cfg = dataclasses.replace(model, lora=LoRAConfig(), activation_checkpointing=False)
        reference = model_shape(frozen_cfg, "lm", lora=False, persistence_threshold=threshold)
        scoring = [scoring_parts("actor", actor, micro, precision)]
        if stage == "ppo" or config.grpo.kl_coef:
            parts += frozen_parts("reference", reference, ds, precision, target, rl.offload_frozen)
            scoring.append(scoring_parts("reference", reference, micro, precision))
        reward_path = rl.reward_model
        if reward_path is not None:
            reward_cfg = _scalar_model(reward_path, frozen_cfg, f"{stage}.reward_model", notes)
            reward = model_shape(reward_cfg, "scalar", lora=False, persistence_threshold=threshold)
            parts += frozen_parts("reward model", reward, ds, precision, target, rl.offload_frozen)
            scoring.append(scoring_parts("reward model", reward, Micro(mb, seq, False, "scalar"), precision))
            starts.append((reward_path, reward))
        if stage == "ppo":
            critic_path = config.ppo.critic_from or reward_path
            critic_cfg = _scalar_model(critic_path, model, "ppo.critic_from", notes)
            critic = model_shape(critic_cfg, "scalar", lora=False, persistence_threshold=threshold)
            parts += engine_parts("critic", critic, ds, precision, target, online)
            critic_micro = Micro(mb, seq, False, "scalar")
            critic_train, activations["critic"] = training_parts("critic", critic, critic_micro, precision)
            parts += critic_train
            scoring.append(scoring_parts("critic", critic, critic_micro, precision))
            if critic_path != reward_path:
                starts.append((critic_path, critic))
        parts += generation_parts("actor", actor, rows, prompt, rl.max_new_tokens, precision)
        parts.append(max((p for group in scoring for p in group), key=lambda p: p.bytes))
    for path, shape in starts:
        parts.append(Part(f"weights read from {path} (until the engines hold them)",
                          _weights_file_bytes(path, shape), "start-up", host=True))
    parts.append(Part("export: consolidated copy of the weights (rank 0)", weight_bytes(precision) * actor.params,
                      "export", host=True))
    baseline = CPU_PROCESS_BASELINE[min(ds.stage, 1)]
    parts.append(Part("runtime: Python, torch, DeepSpeed, llmsys (measured RSS of one process)", baseline, host=True))
    if not target.cpu:
        notes.append("not counted on the GPU: the CUDA context and the allocator's fragmentation "
                     f"(the fit check keeps {HEADROOM:.0%} of the device for them)")
    trained_text = (f"{actor.trained / 1e6:.2f}M trained" if actor.trained != actor.params else "all trained")
    offload = "".join(text for on, text in ((ds.offload_optimizer, " + optimizer offload"),
                                            (ds.offload_param, " + parameter offload")) if on)
    summary = (f"stage={stage}, model {model.name} ({actor.params / 1e6:.2f}M parameters, {trained_text}), "
               f"{precision}, ZeRO-{ds.stage}{offload} on {W} {target.kind} device{'s' if W > 1 else ''}, "
               f"micro-batch {micro.rows} x {micro.length} tokens{' (packed)' if micro.packed else ''}, "
               f"global batch {tcfg.global_batch_size}")
    parts = [p for p in parts if p.bytes or p.phase == RESIDENT]
    return Plan(stage, target, summary, parts, activations, actor.params, notes)


# -- composing a run's config ---------------------------------------------------------------------------------


def compose(overrides: Sequence[str]) -> Config:
    """The validated config ``python -m llmsys.train <overrides>`` would run with; a ConfigError (one line)
    for an unknown key, a bad value or a group option that does not exist."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    register()
    error = unknown_override_error(overrides) or composition_error(overrides)
    if error:
        raise ConfigError(error)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            tree = hydra_compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    return to_config(tree)


# -- what would make it fit -----------------------------------------------------------------------------------


def candidate_settings(config: Config, target: Target) -> list[str]:
    """Single overrides that lower the memory, cheapest in speed first: a fused loss, a smaller reduce
    bucket, a higher ZeRO stage, activation checkpointing, smaller micro-batches (the global batch stays),
    the frozen models in host memory, then offloading the optimizer, the parameters, both (the
    ``deepspeed=zero3_offload`` group)."""
    import importlib.util

    ds, model, tcfg, stage = config.deepspeed, config.model, config.trainer, config.stage.name
    out = []
    if model.loss == "eager" and stage != "reward" and importlib.util.find_spec("triton") is not None:
        out.append("model.loss=fused")
    if ds.stage > 0 and ds.reduce_bucket_size > 50_000_000:
        out.append("deepspeed.reduce_bucket_size=50000000")
    if target.world > 1:  # on one device no ZeRO stage partitions anything (each adds buffers)
        out += [f"deepspeed.stage={z}" for z in range(ds.stage + 1, 4)]
    if not model.activation_checkpointing:
        out.append("model.activation_checkpointing=true")
    mb = tcfg.micro_batch_size // 2
    while mb >= 1:
        if tcfg.global_batch_size % (mb * target.world) == 0:
            out.append(f"trainer.micro_batch_size={mb}")
        mb //= 2
    if stage in ("ppo", "grpo") and not getattr(config, stage).offload_frozen:
        out.append(f"{stage}.offload_frozen=true")
    if ds.stage >= 1 and not ds.offload_optimizer:
        out.append("deepspeed.offload_optimizer=true")
    if ds.stage == 3 and not ds.offload_param:
        out.append("deepspeed.offload_param=true")
    if not (ds.stage == 3 and ds.offload_optimizer and ds.offload_param):
        out.append("deepspeed=zero3_offload")
    return out


def fits(peak: int, memory: int) -> str:
    """``fits``, ``tight`` (within the last HEADROOM of the device) or ``does not fit``."""
    if peak <= (1 - HEADROOM) * memory:
        return "fits"
    return "tight" if peak <= memory else "does not fit"


def what_fits(overrides: Sequence[str], config: Config, target: Target, memory: int) -> list[dict]:
    """Each single candidate setting with the peak it would give and whether that fits; a candidate
    the schema refuses in this config is left out."""
    found = []
    for setting in candidate_settings(config, target):
        try:
            changed = plan_run(compose([*overrides, setting]), target)
        except (ConfigError, PlanError):
            continue
        peak, phase = changed.peak()
        found.append({"setting": setting, "peak_bytes": peak, "phase": phase, "verdict": fits(peak, memory)})
    return found


# -- expected step time ---------------------------------------------------------------------------------------


def default_device_name(kind: str) -> Optional[str]:
    """This machine's device as the benchmarks stamp it (``benchmarks/common.py``), when it is of ``kind``."""
    import torch

    if kind == "cuda":
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def benchmark_rows(directory: Path) -> list[dict]:
    """Every row of the benchmark JSON files in ``directory`` (lists of objects), each with its ``_file``."""
    rows: list[dict] = []
    for file in sorted(directory.glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for row in data if isinstance(data, list) else []:
            if isinstance(row, dict):
                rows.append({**row, "_file": file.name})
    return rows


def kernels_name(model: ModelConfig) -> Optional[str]:
    """The ``kernels`` label ``benchmarks/stages.py`` gives this model's kernel choices (each one change from
    sdpa attention, the eager loss and torch's ops), or None for a combination it does not sweep."""
    ops = (model.norm, model.rope, model.mlp)
    if model.loss == "eager" and ops == ("torch",) * 3:
        return {"sdpa": "sdpa", "triton": "triton", "flash_attn": "flash_attn"}[model.attention]
    if model.attention == "sdpa" and model.loss == "fused" and ops == ("torch",) * 3:
        return "fused_loss"
    if model.attention == "sdpa" and model.loss == "eager" and ops == ("fused",) * 3:
        return "fused_ops"
    return None


def expected_step(config: Config, plan: Plan, rows: list[dict], device: Optional[str]) -> dict:
    """The step time a benchmark row measured at this shape on this device, or why there is none.

    A row matches when it is not a smoke run, its ``device`` contains ``device``, and its stage
    (``stage``, else pre-training for ``train_throughput`` rows), ``params``, ``seq_len``, ``micro_batch``,
    ``precision`` and ZeRO stage (``zero_stage`` or ``deepspeed_config`` zeroN) equal the run's, and
    ``attention`` / ``loss`` / ``activation_checkpointing`` / ``kernels`` (:func:`kernels_name`) where the row
    records them; peers' rows (``impl`` other than llmsys), summaries and failed points never match. Rows at this world
    size are preferred; another world size's per-device rate is used (and said) otherwise; the newest row
    (by file name, which carries the date) wins. The time is the row's ``step_time_s`` when it has one at
    this world size, else this run's tokens per device per step (``global_batch_size`` sequences of
    ``data.seq_len``, two per pair for reward and DPO) over its ``tokens_per_sec_per_device``; PPO and GRPO
    rows need ``step_time_s`` (an iteration is generation, scoring and updates, not a token rate)."""
    if device is None:
        return {"seconds": None, "why": "no benchmark row for this device/shape (no GPU here to name the device: "
                                        "pass --device-name, e.g. H100)"}
    tcfg, model, stage = config.trainer, config.model, config.stage.name
    online = stage in ("ppo", "grpo")
    wanted = {"seq_len": config.data.seq_len, "micro_batch": tcfg.micro_batch_size, "precision": tcfg.precision}
    matches = []
    for row in rows:
        if row.get("smoke") or device not in str(row.get("device", "")):
            continue
        if row.get("impl", "llmsys") != "llmsys" or "kind" in row or row.get("status", "ok") != "ok":
            continue  # a peer's row (TRL, the plain loop), a summary, or a point that failed
        bench = row.get("bench") or row.get("subject")
        if bench not in ("train_throughput", "stages"):
            continue
        if row.get("stage", "pretrain" if bench == "train_throughput" else None) != stage:
            continue
        if any(row.get(k) != v for k, v in wanted.items()):
            continue
        if row.get("params") != plan.params:
            continue
        zero = row.get("zero_stage")
        if zero is None and isinstance(row.get("deepspeed_config"), str):
            digits = re.findall(r"zero(\d)", row["deepspeed_config"])
            zero = int(digits[0]) if digits else None
        if zero != config.deepspeed.stage:
            continue
        if any(k in row and row[k] != getattr(model, k) for k in ("attention", "loss", "activation_checkpointing")):
            continue
        if "kernels" in row and row["kernels"] != kernels_name(model):
            continue
        same_world = row.get("world_size") == plan.target.world
        if not ((row.get("step_time_s") and same_world) or (row.get("tokens_per_sec_per_device") and not online)):
            continue
        matches.append(row)
    if not matches:
        return {"seconds": None, "why": f"no benchmark row for this device/shape ({device}, stage={stage}, "
                                        f"{plan.params / 1e6:.2f}M parameters, seq {config.data.seq_len}, "
                                        f"micro-batch {tcfg.micro_batch_size}, {tcfg.precision}, "
                                        f"ZeRO-{config.deepspeed.stage})"}
    same = [r for r in matches if r.get("world_size") == plan.target.world]
    row = (same or matches)[-1]
    if row.get("step_time_s") and row.get("world_size") == plan.target.world:
        seconds = float(row["step_time_s"])
    else:
        rows_per_sample = 2 if stage in ("reward", "dpo") else 1
        tokens = rows_per_sample * tcfg.global_batch_size * config.data.seq_len / plan.target.world
        seconds = tokens / float(row["tokens_per_sec_per_device"])
    where = f"{row['_file']}: {row.get('device')}, world size {row.get('world_size')}"
    if not same:
        where += f" (its per-device rate; this run has {plan.target.world})"
    return {"seconds": seconds, "tokens_per_sec_per_device": row.get("tokens_per_sec_per_device"), "row": where}

# -- the report -----------------------------------------------------------------------------------------------


def report(plan: Plan, memory: Optional[int], suggestions: list[dict], step: dict) -> dict:
    """Everything the table shows, as plain data (``--json``)."""
    peak, phase = plan.peak()
    host_peak, host_phase = plan.peak(host=True)
    out: dict[str, Any] = {
        "summary": plan.summary, "stage": plan.stage, "device": plan.target.kind, "devices": plan.target.world,
        "parts": [dataclasses.asdict(p) for p in plan.parts],
        "phases": plan.phase_totals(), "peak_bytes": peak, "peak_phase": phase,
        "activations": plan.activations, "step_time": step, "notes": plan.notes,
    }
    if not plan.target.cpu:
        out["host_phases"] = plan.phase_totals(host=True)
        out["host_peak_bytes"], out["host_peak_phase"] = host_peak, host_phase
    if memory is not None:
        verdict = fits(peak, memory)
        out.update(device_memory_bytes=memory, verdict=verdict, suggestions=suggestions)
        fitting = [s for s in suggestions if s["verdict"] == "fits"]
        out["fix"] = fitting[0] if verdict != "fits" and fitting else None
    return out


def render(data: dict) -> str:
    """The report as a readable table (GB = 10^9 bytes)."""
    lines = [f"llmsys.plan: {data['summary']}", ""]
    cpu = data["device"] == "cpu"
    width = max([len(p["name"]) for p in data["parts"]] + [40])
    header = "memory per device (the process's RSS)" if cpu else "memory per device"
    lines.append(f"{header:<{width}}  {'GB':>8}  phase")
    for part in data["parts"]:
        where = " (host)" if part["host"] and not cpu else ""
        lines.append(f"  {part['name'] + where:<{width}}  {gb(part['bytes']):>8}  {part['phase']}")
    lines.append("")
    lines.append("total per phase (resident + the phase's own parts):")
    for phase, total in data["phases"].items():
        mark = "  <- peak" if phase == data["peak_phase"] else ""
        lines.append(f"  {phase:<{width}}  {gb(total):>8}{mark}")
    if not cpu:
        label = f"host memory per process, peak ({data['host_peak_phase']})"
        lines.append(f"  {label:<{width}}  {gb(data['host_peak_bytes']):>8}")
    for label, act in data["activations"].items():
        lines.append(f"activations ({label}): {gb(act['without_checkpointing'])} GB without "
                     f"model.activation_checkpointing, {gb(act['with_checkpointing'])} GB with; one block "
                     f"{gb(act['per_block'])} GB")
    step = data["step_time"]
    if step["seconds"] is None:
        lines.append(f"step time: {step['why']}")
    else:
        lines.append(f"step time: {step['seconds']:.3g} s expected (from {step['row']})")
    for note in data["notes"]:
        lines.append(f"note: {note}")
    lines.append("")
    if "verdict" in data:
        memory, peak = data["device_memory_bytes"], data["peak_bytes"]
        head = (f"peak {gb(peak)} GB ({data['peak_phase']}) of {gb(memory)} GB: ")
        if data["verdict"] == "fits":
            lines.append(head + f"FITS ({peak / memory:.0%} of the device)")
        else:
            verdict = "DOES NOT FIT" if data["verdict"] == "does not fit" else (
                f"TIGHT (above {1 - HEADROOM:.0%} of the device)")
            fix = data["fix"]
            if fix:
                lines.append(head + f"{verdict}; it would fit with {fix['setting']} "
                             f"(peak {gb(fix['peak_bytes'])} GB)")
            else:
                closest = min(data["suggestions"], key=lambda s: s["peak_bytes"], default=None)
                lines.append(head + f"{verdict}; no single setting makes it fit" +
                             (f" (closest: {closest['setting']}, {gb(closest['peak_bytes'])} GB)" if closest else ""))
    else:
        lines.append(f"peak {gb(data['peak_bytes'])} GB ({data['peak_phase']}); pass --device-memory to check the fit")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmsys.plan", description="Memory per device of a run, before anything is launched: "
        "give the Hydra overrides of the run (stage=sft model=llama-1b ...) and the options below.")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel devices (ranks) of the run")
    parser.add_argument("--device-memory", default=None, help="memory of one device, e.g. 80GB or 80GiB")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu: the run trains on CPU processes, memory = each process's RSS")
    parser.add_argument("--device-name", default=None,
                        help="benchmark rows whose device contains this (default: this machine's device)")
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARK_RESULTS,
                        help="folder of benchmark JSON rows (default: benchmarks/results of this checkout)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"not an option or a key=value override: {' '.join(stray)}")
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    try:
        memory = parse_bytes(args.device_memory) if args.device_memory is not None else None
    except ValueError as err:
        parser.error(f"--device-memory: {err}")
    target = Target(args.device, args.devices)
    try:
        config = compose(rest)
        plan = plan_run(config, target)
        suggestions = what_fits(rest, config, target, memory) if memory is not None else []
    except (ConfigError, PlanError) as err:
        print(f"llmsys.plan: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    device_name = args.device_name or default_device_name(args.device)
    step = expected_step(config, plan, benchmark_rows(args.benchmarks) if args.benchmarks.is_dir() else [], device_name)
    data = report(plan, memory, suggestions, step)
    print(json.dumps(data, indent=2) if args.json else render(data))


if __name__ == "__main__":
    main()
