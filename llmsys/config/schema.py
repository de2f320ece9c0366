"""Typed configuration schema: one dataclass per component.

The YAML files under ``configs/`` only select and override these schemas; Hydra validates every
override against them (unknown keys and wrong types fail at start). ``__post_init__`` checks run
when the composed tree is converted to objects by :func:`llmsys.config.to_config`, so each
component receives a validated object of its own type, never the whole tree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

# Stages that have a trainer in this version (GRPO follows later).
STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")
DPO_LOSSES = ("sigmoid", "ipo")
KL_ESTIMATORS = ("k1", "k2", "k3")
ONLINE_ADVANTAGES = ("grpo", "rloo", "reinforce_pp")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence")
ATTENTION_IMPLS = ("sdpa", "triton", "flash_attn")
LOSS_IMPLS = ("eager", "fused")
OP_IMPLS = ("torch", "fused")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("offline", "online", "disabled")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
PIPELINE_PROBES = ("format_stop", "exact_answer")  # the functions: llmsys.pipeline.PROBES
# Keys every pipeline stage command sets from the recipe's name/steps and --out; a recipe may not set them.
PIPELINE_OWNED_KEYS = ("stage", "trainer.output_dir", "trainer.max_steps", "trainer.resume")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and what was expected."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, choices: tuple, key: str) -> None:
    _check(value in choices, key, f"got {value!r}, expected one of {', '.join(map(str, choices))}")


@dataclass
class StageConfig:
    name: str = "pretrain"
    """Which training stage runs: pretrain, sft, reward (Bradley-Terry reward model), ppo, dpo or grpo
    (the critic-free family: GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO and GSPO settings)."""

    def __post_init__(self) -> None:
        _one_of(self.name, STAGES, "stage.name")


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, "LoRA"): W x + (alpha / rank) * B A x on the targeted projections,
    with every other weight of the model frozen. The export merges them into W (see ``llmsys.models.lora``)."""

    rank: int = 0
    """Adapter rank r; 0 turns LoRA off (all weights train)."""
    alpha: float = 16.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only); the frozen path sees the input unchanged."""
    targets: List[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    """Projections that get adapters, in every block: wq, wk, wv, wo (attention), w1, w2, w3 (SwiGLU MLP)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.rank, int) and self.rank >= 0, "model.lora.rank",
               f"must be an integer >= 0 (0 = off), got {self.rank!r}")
        _check(self.alpha > 0, "model.lora.alpha", f"must be positive, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        for target in self.targets:
            _one_of(target, LORA_TARGETS, "model.lora.targets")
        _check(len(set(self.targets)) == len(self.targets), "model.lora.targets",
               f"lists a projection twice: {list(self.targets)}")
        _check(self.rank == 0 or len(self.targets) > 0, "model.lora.targets",
               f"is empty, but model.lora.rank={self.rank}; name at least one of {', '.join(LORA_TARGETS)}")


@dataclass
class Architecture:
    """What a checkpoint is: the shapes and constants its weights were trained with.

    An export's config.json records exactly these fields (``llmsys.models.export``), and a run that starts
    from a checkpoint (``model.init_from``) takes them from there, whatever its own ``model.*`` says;
    :class:`ModelConfig` adds how a run computes the model, which no checkpoint records.
    """

    name: str = "tiny"
    """Label used in the run directory and the exported config."""
    vocab_size: int = 0
    """Embedding rows. 0 takes the tokenizer's size rounded up to ``pad_vocab_multiple``."""
    pad_vocab_multiple: int = 64
    """When ``vocab_size`` is taken from the tokenizer, round it up to a multiple of this."""
    dim: int = 256
    """Hidden size (d_model)."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention; None means n_heads (multi-head attention)."""
    ffn_dim: int = 0
    """SwiGLU hidden size; 0 uses the Llama rule (2/3 of 4*dim, rounded up to ffn_multiple_of)."""
    ffn_multiple_of: int = 256
    """Rounding for the Llama ffn rule."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables are built for."""
    rope_theta: float = 10000.0
    """Rotary embedding base (Llama 2: 1e4, Llama 3: 5e5)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with the output projection."""
    qkv_bias: bool = False
    """Bias on the query/key/value projections, zero-initialised (Qwen2's layout; Llama has none)."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections use init_std / sqrt(2 * n_layers). Recorded with
    the checkpoint, as Hugging Face's ``initializer_range`` is."""

    def __post_init__(self) -> None:
        for key in ("dim", "n_layers", "n_heads", "max_seq_len", "pad_vocab_multiple", "ffn_multiple_of"):
            _check(getattr(self, key) > 0, f"model.{key}", f"must be positive, got {getattr(self, key)}")
        _check(self.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
        _check(self.ffn_dim >= 0, "model.ffn_dim", "must be >= 0 (0 = Llama rule)")
        _check(self.dim % self.n_heads == 0, "model.dim",
               f"{self.dim} is not divisible by model.n_heads={self.n_heads}")
        _check((self.dim // self.n_heads) % 2 == 0, "model.dim",
               f"head_dim {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_kv_heads is not None:
            _check(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0, "model.n_kv_heads",
                   f"{self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        _check(self.rope_theta > 0, "model.rope_theta", "must be positive")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(2 * 4 * self.dim / 3)
        return self.ffn_multiple_of * ((hidden + self.ffn_multiple_of - 1) // self.ffn_multiple_of)

    def architecture_dict(self) -> Dict[str, Any]:
        """The architecture fields by name (a ModelConfig's run-time fields left out): what an export records."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Architecture)}


@dataclass
class ModelConfig(Architecture):
    """The ``model`` config: an :class:`Architecture` plus this run's implementation choices (kernels,
    recomputation, adapters) and where its weights start. None of these change what the weights mean, so
    no checkpoint records them and a run that starts from one keeps its own (:meth:`with_architecture`)."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (saves memory, costs ~1/3 compute)."""
    attention: str = "sdpa"
    """Attention: sdpa (torch scaled_dot_product_attention), triton (llmsys's fused FlashAttention-2
    kernel; interpreted on CPU) or flash_attn (the flash-attn package, CUDA only)."""
    loss: str = "eager"
    """LM loss: eager (logits, then cross-entropy) or fused (llmsys's chunked linear+cross-entropy
    kernel, which never holds the full tokens x vocabulary logits)."""
    norm: str = "torch"
    """RMSNorm: torch, or fused (llmsys._C kernel with the residual add fused in; CUDA or its CPU twin)."""
    rope: str = "torch"
    """Rotary embedding: torch, or fused (llmsys._C kernel)."""
    mlp: str = "torch"
    """SwiGLU activation: torch, or fused (llmsys._C kernel)."""
    decode_attention: str = "torch"
    """Attention of single-token KV-cache decoding steps: torch (SDPA over the cache with a length mask)
    or fused (llmsys._C split-KV decode kernel)."""
    init_from: Optional[str] = None
    """Start from an exported llmsys model directory (``.../final``) or a Hugging Face Llama-family
    model directory (see ``llmsys.models.hf``) instead of random weights."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Low-rank adapters; ``model.lora.rank > 0`` trains only them and freezes every other weight."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # dataclasses.asdict's form (old exports recorded it so)
            self.lora = LoRAConfig(**self.lora)
        super().__post_init__()
        _one_of(self.attention, ATTENTION_IMPLS, "model.attention")
        _one_of(self.loss, LOSS_IMPLS, "model.loss")
        for key in ("norm", "rope", "mlp", "decode_attention"):
            _one_of(getattr(self, key), OP_IMPLS, f"model.{key}")
        if self.decode_attention == "fused":
            _check(self.head_dim in (32, 64, 128, 256), "model.decode_attention",
                   f"the fused decode kernel supports head_dim 32, 64, 128, 256; this model has {self.head_dim}")
        if self.attention == "flash_attn":
            import importlib.util

            _check(importlib.util.find_spec("flash_attn") is not None, "model.attention",
                   "flash_attn needs the flash-attn package (pip install 'llmsys[gpu]' on a CUDA machine); "
                   "use model.attention=triton or sdpa")
        if self.attention == "triton" or self.loss == "fused":
            import importlib.util

            _check(importlib.util.find_spec("triton") is not None, "model.attention" if self.attention == "triton"
                   else "model.loss", "needs the triton package, which has wheels for Linux only")

    def with_architecture(self, architecture: Architecture) -> "ModelConfig":
        """``architecture``'s fields with this config's implementation choices (and init_from) kept."""
        return dataclasses.replace(self, **architecture.architecture_dict())


@dataclass
class DataConfig:
    name: str = "shakespeare"
    """Label used in the run directory."""
    path: Optional[str] = None
    """Local .txt/.md/.jsonl/.parquet file or a folder of them. Exactly one of path/dataset."""
    dataset: Optional[str] = None
    """A Hugging Face `datasets` name (or local dataset directory) instead of ``path``."""
    dataset_config: Optional[str] = None
    """The `datasets` configuration name, if the dataset has several."""
    split: str = "train"
    """The `datasets` split to read."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.parquet rows and `datasets` rows."""
    tokenizer: Optional[str] = None
    """Local tokenizer directory (tokenizer.json) or hub name; None trains a byte-level BPE on the corpus."""
    bpe_vocab_size: int = 4096
    """Vocabulary size of the BPE trained when ``tokenizer`` is None."""
    seq_len: int = 256
    """Tokens per training sequence (block length)."""
    val_fraction: float = 0.05
    """Fraction of the token stream (taken from its end) held out for validation."""
    num_proc: int = 2
    """Worker processes for tokenisation."""
    cache_dir: Optional[str] = None
    """Where tokenizers and packed token files are cached; None uses $LLMSYS_HOME/data."""
    sft_overflow: str = "truncate"
    """SFT: an example longer than ``seq_len`` tokens is ``truncate``d (its first ``seq_len``
    tokens kept; dropped if no assistant token is left) or ``drop``ped. Preference pairs: ``truncate``
    keeps the prompt's last and the responses' first tokens (llmsys/data/preference.py) or ``drop``s
    the pair. Counts go to the manifest."""
    chat_template: str = "auto"
    """SFT and preference data: ``auto`` uses the tokenizer's own chat template (tokenizer_config.json,
    rendered by `transformers`) when it has one, else the built-in ChatML; ``chatml`` always uses the
    built-in."""

    def __post_init__(self) -> None:
        _check(self.sft_overflow in ("truncate", "drop"), "data.sft_overflow",
               f"must be truncate or drop, got {self.sft_overflow!r}")
        _check(self.chat_template in ("auto", "chatml"), "data.chat_template",
               f"must be auto or chatml, got {self.chat_template!r}")
        _check((self.path is None) != (self.dataset is None), "data.path",
               f"set exactly one of data.path and data.dataset (got path={self.path!r}, "
               f"dataset={self.dataset!r})")
        _check(self.seq_len > 1, "data.seq_len", f"must be > 1, got {self.seq_len}")
        _check(0.0 < self.val_fraction < 0.5, "data.val_fraction",
               f"must be in (0, 0.5), got {self.val_fraction}")
        _check(self.num_proc >= 1, "data.num_proc", "must be >= 1")
        _check(self.bpe_vocab_size >= 260, "data.bpe_vocab_size",
               f"must be >= 260 (256 bytes + special tokens), got {self.bpe_vocab_size}")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer (AdamW; DeepSpeed's CPU Adam when the optimizer state is offloaded)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and linear schedules)."""
    weight_decay: float = 0.1
    """Decoupled weight decay; not applied to norms."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 30
    """Linear warm-up from 0 to ``lr`` over this many optimizer steps."""
    schedule: str = "cosine"
    """Decay after warm-up: cosine, linear or constant."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        _one_of(self.name, ("adamw",), "optim.name")
        _check(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optim.betas",
               f"expected two values in [0, 1), got {list(self.betas)}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _one_of(self.schedule, SCHEDULES, "optim.schedule")


@dataclass
class TrainerConfig:
    output_dir: str = "outputs/${stage.name}-${model.name}-${data.name}"
    """Run directory: config, metrics, checkpoints and the final export. Same on every rank."""
    max_steps: int = 300
    """Optimizer steps to train for."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all ranks (micro_batch_size * world_size * grad accumulation)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    precision: str = "fp32"
    """fp32 or bf16 (bf16 weights/activations with fp32 master weights and optimizer state)."""
    seed: int = 1234
    """Seeds the model init and the data order."""
    resume: str = "auto"
    """none, auto (latest checkpoint in output_dir, if any) or a checkpoint directory."""
    save_every: int = 100
    """Save a checkpoint every N steps (and always at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep; older ones are deleted after a newer one is complete."""
    eval_every: int = 50
    """Evaluate on the validation split every N steps (and at the end); 0 disables."""
    eval_samples: int = 64
    """Validation sequences per evaluation (0 or more than the split: all of them)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one device, for MFU. None: looked up for known GPUs, else MFU is not reported."""
    max_bad_steps: int = 3
    """Optimizer steps with a non-finite loss or gradient are skipped (and counted as skipped_steps); this
    many in a row stop the run with an error, before any checkpoint or export is written from them."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "keep_checkpoints",
                    "max_bad_steps"):
            _check(getattr(self, key) > 0, f"trainer.{key}", f"must be positive, got {getattr(self, key)}")
        for key in ("save_every", "eval_every", "eval_samples"):
            _check(getattr(self, key) >= 0, f"trainer.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.global_batch_size % self.micro_batch_size == 0, "trainer.global_batch_size",
               f"{self.global_batch_size} is not a multiple of trainer.micro_batch_size={self.micro_batch_size}")
        _one_of(self.precision, PRECISIONS, "trainer.precision")
        _check(bool(self.resume), "trainer.resume", "expected none, auto or a checkpoint path")


@dataclass
class DeepSpeedConfig:
    stage: int = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer state), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory and step it with DeepSpeed's CPU Adam (stage >= 1)."""
    offload_param: bool = False
    """Keep parameters in CPU memory between uses (stage 3 only)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with the backward pass."""
    contiguous_gradients: bool = True
    """Copy gradients into a contiguous buffer as they are produced."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket (stages 1-2)."""
    stage3_prefetch_bucket_size: int = 50_000_000
    """Elements of parameters prefetched ahead of use (stage 3)."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay unpartitioned (stage 3)."""
    backend: Optional[str] = None
    """torch.distributed backend; None picks nccl on CUDA and gloo on CPU."""
    timeout_minutes: int = 30
    """Collective timeout: after this long in one collective (DeepSpeed's included) every live rank exits with
    status 4, naming the collective and the rank that is not responding, instead of hanging."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config entries merged last (for knobs without a field here)."""

    def __post_init__(self) -> None:
        _one_of(self.stage, (0, 1, 2, 3), "deepspeed.stage")
        _check(not self.offload_optimizer or self.stage >= 1, "deepspeed.offload_optimizer",
               "needs ZeRO stage >= 1")
        _check(not self.offload_param or self.stage == 3, "deepspeed.offload_param", "needs ZeRO stage 3")
        _check(self.timeout_minutes > 0, "deepspeed.timeout_minutes", "must be positive")


@dataclass
class LoggerConfig:
    progress: bool = True
    """Show a live progress bar (rank 0)."""
    wandb: bool = False
    """Log metrics to Weights & Biases as well as metrics.jsonl."""
    wandb_mode: str = "offline"
    """offline (no network; `wandb sync` later), online, or disabled."""
    wandb_project: str = "llmsys"
    """W&B project."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user); None uses the account default."""
    run_name: Optional[str] = None
    """Run name shown in W&B; None uses the output directory's name."""

    def __post_init__(self) -> None:
        _one_of(self.wandb_mode, WANDB_MODES, "logger.wandb_mode")


@dataclass
class DPOConfig:
    """Direct preference optimisation (stage=dpo; Rafailov et al. 2023)."""

    beta: float = 0.1
    """Strength of the implicit KL constraint to the reference model."""
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a preference label is flipped (sigmoid loss only)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO) or ipo (Azar et al. 2023)."""
    nll_weight: float = 0.0
    """Weight of the chosen responses' per-token NLL added to the loss (RPO, Pang et al. 2024; 0 = off)."""

    def __post_init__(self) -> None:
        _check(self.beta > 0, "dpo.beta", f"must be positive, got {self.beta}")
        _check(0.0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        _one_of(self.loss_type, DPO_LOSSES, "dpo.loss_type")
        _check(self.nll_weight >= 0, "dpo.nll_weight", f"must be >= 0, got {self.nll_weight}")
        _check(self.loss_type == "sigmoid" or self.label_smoothing == 0.0, "dpo.label_smoothing",
               "applies to the sigmoid loss only")


@dataclass
class PPOConfig:
    """PPO with a learned reward (stage=ppo; Ouyang et al. 2022, Ziegler et al. 2019).

    The actor starts from ``model.init_from`` (the SFT export), which is also the frozen reference.
    One iteration (= one ``trainer.max_steps`` step): generate ``rollout_batch_size`` responses, score
    them, then ``ppo_epochs`` passes over minibatches of ``trainer.global_batch_size`` sequences.
    """

    reward_model: Optional[str] = None
    """The reward stage's export directory (``.../final``). Required."""
    critic_from: Optional[str] = None
    """Where the critic (value model) starts: a reward export or an LM export; None = reward_model."""
    rollout_batch_size: int = 32
    """Prompts per iteration over all ranks (a multiple of trainer.global_batch_size)."""
    max_new_tokens: int = 32
    """Longest generated response."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (0 = greedy); log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    clip_eps: float = 0.2
    """Policy ratio clip range."""
    value_clip_eps: float = 0.2
    """Value clip range around the rollout's values."""
    entropy_coef: float = 0.0
    """Entropy bonus weight in the policy loss."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_estimator: str = "k1"
    """Per-token KL(actor || reference) estimator in the reward: k1, k2 or k3."""
    init_kl_coef: float = 0.05
    """beta of the KL penalty (its start value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target sequence KL for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in rollouts) of the adaptive controller."""
    reward_clip: float = 0.0
    """Clip reward-model scores to [-c, c]; 0 disables."""
    normalize_reward: bool = True
    """Whiten scores with running statistics before the KL penalty is added."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that hit max_new_tokens without the end-of-turn token."""
    critic_lr: float = 0.0
    """Critic learning rate; 0 uses optim.lr."""
    critic_warmup_iters: int = 0
    """Iterations at the start that update the critic only (the actor waits for sane values)."""
    offload_frozen: bool = False
    """Keep the frozen reference and reward models in CPU memory: under ZeRO-3 DeepSpeed's parameter
    offload; under ZeRO 0-2 they also run on the CPU."""
    log_samples: int = 2
    """Decoded (prompt, response, score) examples written to samples.jsonl per iteration."""

    def __post_init__(self) -> None:
        for key in ("rollout_batch_size", "max_new_tokens", "ppo_epochs", "kl_horizon"):
            _check(getattr(self, key) > 0, f"ppo.{key}", f"must be positive, got {getattr(self, key)}")
        _check(self.temperature >= 0, "ppo.temperature", "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "ppo.top_p", "must be in (0, 1]")
        for key in ("clip_eps", "value_clip_eps", "entropy_coef", "init_kl_coef", "reward_clip",
                    "missing_eos_penalty", "critic_lr", "critic_warmup_iters", "log_samples"):
            _check(getattr(self, key) >= 0, f"ppo.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(0.0 < self.gamma <= 1.0, "ppo.gamma", "must be in (0, 1]")
        _check(0.0 <= self.lam <= 1.0, "ppo.lam", "must be in [0, 1]")
        _check(self.kl_target > 0, "ppo.kl_target", "must be positive")
        _one_of(self.kl_estimator, KL_ESTIMATORS, "ppo.kl_estimator")


@dataclass
class RewardSourceConfig:
    """One term of the online reward: ``weight * source(prompts, responses, metadata)``."""

    source: str = "exact_answer"
    """A built-in (exact_answer: 1 when the response's final number equals the row's ``answer``; format;
    annotator: the rule-based annotator's score; reward_model: the learned reward model of
    ``grpo.reward_model``) or a user function by import path, ``package.module:function``."""
    weight: float = 1.0
    """Its weight in the summed reward."""

    def __post_init__(self) -> None:
        _check(bool(self.source), "grpo.rewards.source", "is empty")


@dataclass
class GRPOConfig:
    """Critic-free online RL (stage=grpo): sample ``group_size`` responses per prompt, score them with the
    rewards, and update the policy with a clipped surrogate against advantages that need no value model.

    The actor and the frozen reference start from ``model.init_from`` (the SFT export). Settings of the
    family: GRPO (Shao et al. 2024: ``advantage=grpo``, ``loss_agg=seq-mean-token-mean``, KL as a loss
    term); Dr. GRPO (Liu et al. 2025: ``normalize_std=false``, ``loss_agg=seq-mean-token-sum-norm``); RLOO
    (Ahmadian et al. 2024: ``advantage=rloo``); REINFORCE++ (Hu 2025: ``advantage=reinforce_pp``,
    ``kl_in_reward=true``, ``group_size=1`` allowed); DAPO (Yu et al. 2025: ``clip_high > clip_low``,
    ``loss_agg=token-mean``, ``dynamic_sampling``, ``overlong_buffer``); GSPO (Zheng et al. 2025:
    ``ratio_level=sequence``).
    """

    advantage: str = "grpo"
    """grpo (reward minus its group's mean, over the group's std), rloo (minus the mean of the others of
    its group) or reinforce_pp (returns-to-go of KL-shaped token rewards, whitened over the global batch)."""
    normalize_std: bool = True
    """advantage=grpo: divide by the group's std (false: Dr. GRPO's unbiased ``r - mean``)."""
    group_size: int = 4
    """Responses sampled per prompt (consecutive rows of a rollout)."""
    rollout_batch_size: int = 32
    """Sequences per iteration over all ranks (prompts x group_size; a multiple of trainer.global_batch_size)."""
    max_new_tokens: int = 16
    """Longest generated response."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy); log-probs use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts."""
    epochs: int = 1
    """Passes over each rollout batch (GRPO's mu); minibatches of trainer.global_batch_size sequences."""
    clip_low: float = 0.2
    """Ratio clip below: 1 - clip_low."""
    clip_high: float = 0.2
    """Ratio clip above: 1 + clip_high (DAPO's clip-higher when larger than clip_low)."""
    loss_agg: str = "token-mean"
    """How per-token losses become one: token-mean (DAPO), seq-mean-token-mean (GRPO as published) or
    seq-mean-token-sum-norm (Dr. GRPO, normalised by max_new_tokens)."""
    ratio_level: str = "token"
    """token (PPO/GRPO) or sequence (GSPO: one length-normalised ratio per response)."""
    kl_coef: float = 0.04
    """beta of the KL to the frozen reference; 0 skips the reference model."""
    kl_in_reward: bool = False
    """false: beta * k3 as a loss term (GRPO); true: -beta * KL_t in the per-token reward (REINFORCE++)."""
    kl_estimator: str = "k1"
    """Estimator of the KL in the reward (kl_in_reward=true): k1, k2 or k3."""
    gamma: float = 1.0
    """advantage=reinforce_pp: discount of the returns-to-go."""
    rewards: List[RewardSourceConfig] = field(default_factory=lambda: [RewardSourceConfig()])
    """The reward: a weighted sum of sources (default: the exact-answer check of the verifiable task)."""
    reward_model: Optional[str] = None
    """A reward stage's export, for a ``reward_model`` source."""
    dynamic_sampling: bool = False
    """DAPO: groups whose rewards are all equal carry no signal; leave them out of the loss (counted in
    ``dropped_groups``)."""
    overlong_buffer: int = 0
    """DAPO's soft over-length penalty: a response longer than max_new_tokens - overlong_buffer loses up to
    ``overlong_penalty``, linearly to the limit; 0 = off."""
    overlong_penalty: float = 1.0
    """The penalty at max_new_tokens (with overlong_buffer > 0)."""
    logprob_diff_warn: float = 0.05
    """Mean |decode log-prob - training log-prob| per response token above which a warning is logged."""
    logprob_diff_stop: float = 0.5
    """... above which the run stops with a diagnostic (0 = never): the rollout would be off-policy."""
    tis_cap: float = 0.0
    """Truncated importance sampling (Yao et al. 2025): weight each token's policy gradient by
    min(p_train / p_decode, tis_cap) to correct what the two paths disagree on; 0 = off."""
    offload_frozen: bool = False
    """Keep the frozen reference (and reward model) in CPU memory (see ppo.offload_frozen)."""
    log_samples: int = 2
    """Decoded (prompt, response, reward) examples written to samples.jsonl per iteration."""

    def __post_init__(self) -> None:
        _one_of(self.advantage, ONLINE_ADVANTAGES, "grpo.advantage")
        _one_of(self.loss_agg, LOSS_AGGREGATIONS, "grpo.loss_agg")
        _one_of(self.ratio_level, RATIO_LEVELS, "grpo.ratio_level")
        _one_of(self.kl_estimator, KL_ESTIMATORS, "grpo.kl_estimator")
        for key in ("group_size", "rollout_batch_size", "max_new_tokens", "epochs"):
            _check(getattr(self, key) > 0, f"grpo.{key}", f"must be positive, got {getattr(self, key)}")
        _check(self.group_size >= 2 or self.advantage == "reinforce_pp", "grpo.group_size",
               f"advantage={self.advantage} compares a response with the others of its prompt: needs >= 2, "
               f"got {self.group_size}")
        _check(self.rollout_batch_size % self.group_size == 0, "grpo.rollout_batch_size",
               f"{self.rollout_batch_size} is not a multiple of grpo.group_size={self.group_size}")
        _check(self.temperature >= 0, "grpo.temperature", "must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "grpo.top_p", "must be in (0, 1]")
        for key in ("clip_low", "clip_high", "kl_coef", "overlong_buffer", "overlong_penalty", "logprob_diff_warn",
                    "logprob_diff_stop", "tis_cap", "log_samples"):
            _check(getattr(self, key) >= 0, f"grpo.{key}", f"must be >= 0, got {getattr(self, key)}")
        _check(self.clip_low < 1.0, "grpo.clip_low", f"must be < 1, got {self.clip_low}")
        _check(self.overlong_buffer < self.max_new_tokens, "grpo.overlong_buffer",
               f"{self.overlong_buffer} must be smaller than grpo.max_new_tokens={self.max_new_tokens}")
        _check(0.0 < self.gamma <= 1.0, "grpo.gamma", "must be in (0, 1]")
        _check(self.tis_cap == 0 or self.tis_cap >= 1.0, "grpo.tis_cap", f"must be 0 (off) or >= 1, got {self.tis_cap}")
        _check(len(self.rewards) > 0, "grpo.rewards", "is empty; name at least one source")
        _check(self.reward_model is not None or all(r.source != "reward_model" for r in self.rewards),
               "grpo.reward_model", "a reward_model source needs grpo.reward_model=DIR (a reward stage's export)")


@dataclass
class PipelineStageConfig:
    """One stage of a pipeline recipe (``python -m llmsys.pipeline``): it runs as its own process,
    ``python -m llmsys.train stage=<name> trainer.output_dir=<out>/<name> trainer.max_steps=<steps>
    trainer.resume=auto <overrides> <inputs> <the user's overrides>``, on top of ``configs/config.yaml``."""

    name: str = MISSING
    """The training stage (``stage=<name>``) and the run directory ``<out>/<name>``; unique in a recipe."""
    steps: int = MISSING
    """``trainer.max_steps`` at ``--steps-scale 1``."""
    overrides: List[str] = field(default_factory=list)
    """The stage's own Hydra overrides (data source, learning rate, ...), in order; the user's come after."""
    inputs: Dict[str, str] = field(default_factory=dict)
    """Config key -> earlier stage whose export (``<out>/<stage>/final``) it is set to, e.g.
    ``{model.init_from: sft, ppo.reward_model: reward}``; appended after ``overrides``, in order."""
    probes: List[str] = field(default_factory=list)
    """Behaviour probes run on the stage's export for the report (``llmsys.pipeline.PROBES``)."""

    def __post_init__(self) -> None:
        key = f"pipeline.stages[{self.name}]"
        _one_of(self.name, STAGES, f"{key}.name")
        _check(self.steps > 0, f"{key}.steps", f"must be positive, got {self.steps}")
        for override in self.overrides:
            _check("=" in override[1:], f"{key}.overrides", f"{override!r} is not a key=value override")
        overridden = {o.partition("=")[0] for o in self.overrides}
        for where, keys in ((f"{key}.overrides", overridden), (f"{key}.inputs", set(self.inputs))):
            owned = sorted(keys & set(PIPELINE_OWNED_KEYS))
            _check(not owned, where, f"sets {', '.join(owned)}, which the pipeline sets itself (from name, "
                                     f"steps and --out)")
        both = sorted(set(self.inputs) & overridden)
        _check(not both, f"{key}.inputs", f"sets {', '.join(both)}, which overrides set too")
        for probe in self.probes:
            _one_of(probe, PIPELINE_PROBES, f"{key}.probes")


@dataclass
class PipelineConfig:
    """A pipeline recipe (``configs/experiment/<name>.yaml``, ``python -m llmsys.pipeline --recipe <name>``):
    the stages to run, in order, each starting from earlier stages' exports."""

    stages: List[PipelineStageConfig] = field(default_factory=list)
    """The stages in the order they run (and the default of ``--stages``)."""
    side_by_side_prompts: int = 4
    """Held-out prompts that every stage's export answers in the report's side-by-side
    (``<out>/side_by_side.json``); 0 leaves it out."""

    def __post_init__(self) -> None:
        _check(len(self.stages) > 0, "pipeline.stages", "is empty; a recipe names at least one stage")
        _check(self.side_by_side_prompts >= 0, "pipeline.side_by_side_prompts",
               f"must be >= 0 (0 leaves the side-by-side out), got {self.side_by_side_prompts}")
        seen: list[str] = []
        for stage in self.stages:
            _check(stage.name not in seen, "pipeline.stages", f"names stage {stage.name} twice")
            for key, source in stage.inputs.items():
                _check(source in seen, f"pipeline.stages[{stage.name}].inputs",
                       f"{key} reads stage {source!r}, which is not an earlier stage of the recipe "
                       f"(earlier: {', '.join(seen) or 'none'})")
            seen.append(stage.name)
        probed = [stage.name for stage in self.stages if "format_stop" in stage.probes]
        _check(not probed or "sft" in seen, "pipeline.stages",
               f"{', '.join(probed)} run the format_stop probe, which asks the held-out prompts of the sft "
               f"stage's data; add an sft stage")

    def by_name(self) -> Dict[str, PipelineStageConfig]:
        return {stage.name: stage for stage in self.stages}


@dataclass
class Config:
    stage: StageConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    pipeline: Optional[PipelineConfig] = None
    """Set only by a pipeline recipe (``configs/experiment/pipeline.yaml``), which ``llmsys.pipeline``
    reads; training ignores it."""

    def __post_init__(self) -> None:
        if self.stage.name in ("reward", "ppo", "dpo", "grpo"):
            _check(bool(self.model.init_from), "model.init_from",
                   f"stage={self.stage.name} starts from a previous stage's export; set model.init_from=DIR "
                   f"(an llmsys export such as outputs/sft-tiny-chat/final, or a Hugging Face model directory)")
        if self.stage.name == "ppo":
            _check(bool(self.ppo.reward_model), "ppo.reward_model",
                   "stage=ppo needs the reward stage's export: ppo.reward_model=DIR")
            _check(self.ppo.rollout_batch_size % self.trainer.global_batch_size == 0, "ppo.rollout_batch_size",
                   f"{self.ppo.rollout_batch_size} is not a multiple of trainer.global_batch_size="
                   f"{self.trainer.global_batch_size}")
        if self.stage.name == "grpo":
            _check(self.grpo.rollout_batch_size % self.trainer.global_batch_size == 0, "grpo.rollout_batch_size",
                   f"{self.grpo.rollout_batch_size} is not a multiple of trainer.global_batch_size="
                   f"{self.trainer.global_batch_size}")
        if not self.model.init_from:  # else the checkpoint's max_seq_len counts (checked when it is read)
            _check(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                   f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
