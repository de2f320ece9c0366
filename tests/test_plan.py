"""``llmsys.plan``: its numbers against hand-computed values, against what autograd and the allocator
actually hold, and (slow) against the peak RSS of real CPU training runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from llmsys import plan  # noqa: E402
from llmsys.config import LoRAConfig, ModelConfig  # noqa: E402
from llmsys.models import Transformer  # noqa: E402
from llmsys.models.heads import ScalarHeadModel  # noqa: E402
from llmsys.models.transformer import Block, Packing, rotary_tables  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# -- parameters and states, by hand --------------------------------------------------------------------------

# dim 64, 2 blocks, 4 heads of 16, 2 kv heads (kv width 32), ffn 128, vocabulary 256, untied head:
# per block wq 64*64 + wk 64*32 + wv 64*32 + wo 64*64 + w1, w3, w2 3*64*128 + two norms 2*64 = 36,992;
# embedding 256*64 = 16,384, output 16,384, final norm 64.
HAND = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
        "model.vocab_size=256", "model.tie_embeddings=false", "model.max_seq_len=64", "data.seq_len=64"]
N_HAND = 2 * 36_992 + 2 * 16_384 + 64  # 106,816
R = 500_000_000  # deepspeed.reduce_bucket_size's default


def test_the_hand_count_is_the_models():
    cfg = plan.compose(HAND).model
    assert plan.model_shape(cfg, "lm", lora=True, persistence_threshold=100_000).params == N_HAND
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == N_HAND


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=300, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96),
    ModelConfig(vocab_size=300, dim=64, n_layers=3, n_heads=4, ffn_dim=96, tie_embeddings=True, qkv_bias=True),
    ModelConfig(vocab_size=300, dim=64, n_layers=3, n_heads=4, ffn_dim=96,
                lora=LoRAConfig(rank=4, targets=["wq", "w2"])),
], ids=["untied-gqa", "tied-bias", "lora"])
@pytest.mark.parametrize("kind", ["lm", "scalar"])
def test_parameter_counts_match_the_modules(cfg, kind):
    module = (Transformer if kind == "lm" else ScalarHeadModel)(cfg)
    unique = {id(p): p for p in module.parameters()}.values()
    shape = plan.model_shape(cfg, kind, lora=True, persistence_threshold=100_000)
    assert shape.params == sum(p.numel() for p in unique)
    assert shape.trained == sum(p.numel() for p in unique if p.requires_grad)
    assert shape.largest == max(p.numel() for p in unique)


def state_totals(overrides: list[str], world: int, kind: str = "cuda") -> dict[str, int]:
    """Phase totals of the trained engine's parts alone (no activations, no runtime)."""
    config = plan.compose([*HAND, *overrides])
    shape = plan.model_shape(plan.resolve_model(config, []), "lm", lora=True,
                             persistence_threshold=config.deepspeed.stage3_param_persistence_threshold)
    target = plan.Target(kind, world)
    parts = plan.engine_parts(plan.MODEL, shape, config.deepspeed, config.trainer.precision, target)
    return plan.Plan("pretrain", target, "", parts, {}, shape.params).phase_totals()


N, W = N_HAND, 4
# ZeRO-3 keeps tensors under the persistence threshold whole: with 1000, the five norms (5 * 64 elements).
SMALL = 5 * 64


@pytest.mark.parametrize("overrides, expected", [
    # ZeRO-0 fp32: weights 4N, Adam 8N; the gradients (4N) and their flat all-reduce copy (4N); the step.
    (["deepspeed=zero0"], {"resident": 12 * N, "gradient reduction": 20 * N, "optimizer step": 16 * N}),
    # ZeRO-0 bf16: bf16 weights 2N, fp32 master 4N, Adam 8N (created by DeepSpeed's start-up step, with 6N
    # of zero gradients); bf16 gradients and their copy; the step's fp32 gradient copies 4N.
    (["deepspeed=zero0", "trainer.precision=bf16"],
     {"resident": 14 * N, "start-up": 20 * N, "gradient reduction": 18 * N, "optimizer step": 20 * N}),
    # ZeRO-1 fp32 on 4: weights 4N, master 4N/4, Adam 8N/4; the bucket (4R) from the backward through the
    # step; whole gradients 4N until reduced; the step's partitions 4N/4 + 4N/4; the start-up flat copy 4N.
    (["deepspeed=zero1"], {"resident": 7 * N, "start-up": 9 * N, "forward/backward": 7 * N + 4 * R,
                           "gradient reduction": 11 * N + 4 * R, "optimizer step": 9 * N + 4 * R}),
    # ZeRO-2 bf16 on 4: weights 2N, master N, Adam 2N; bucket 2R; gradients 2N/4; the step 2N/4 + 4N/4.
    (["deepspeed=zero2", "trainer.precision=bf16"],
     {"resident": 5 * N, "start-up": 5 * N, "forward/backward": 5 * N + 2 * R,
      "gradient reduction": 5 * N + 2 * R + N // 2, "optimizer step": 5 * N + 2 * R + N // 2 + N}),
    # ZeRO-3 fp32 on 4: weights 4(N/4 + 3/4 of the small ones), master N, Adam 2N, the resident bucket 4R and
    # fp32 gradient partition N; the gathered weights 4 * 3N/4; gradients N; the step's fp32 copy N.
    (["deepspeed=zero3", "deepspeed.stage3_param_persistence_threshold=1000"],
     {"resident": N + 3 * SMALL + 4 * N + 4 * R,
      "forward/backward": 8 * N + 3 * SMALL + 4 * R, "gradient reduction": 9 * N + 3 * SMALL + 4 * R,
      "optimizer step": 6 * N + 3 * SMALL + 4 * R}),
    # Optimizer offload (ZeRO-2 fp32 on 4): the device keeps the weights and the bucket; master, Adam and the
    # step's gradient partitions go to the host.
    (["deepspeed=zero2", "deepspeed.offload_optimizer=true"],
     {"resident": 4 * N, "start-up": 8 * N, "forward/backward": 4 * N + 4 * R,
      "gradient reduction": 5 * N + 4 * R, "optimizer step": 4 * N + 4 * R}),
], ids=["zero0-fp32", "zero0-bf16", "zero1-fp32", "zero2-bf16", "zero3-fp32", "zero2-offload"])
def test_states_per_zero_stage_by_hand(overrides, expected):
    assert state_totals(overrides, W) == expected


def test_on_the_cpu_the_bucket_counts_as_far_as_it_is_written():
    totals = state_totals(["deepspeed=zero2"], 1, kind="cpu")
    # weights 4N, master 4N, Adam 8N; the bucket holds the N gradients (4N) and is dropped after the
    # backward on one rank; the fused AdamW steps in place (no temporaries).
    assert totals["gradient reduction"] == 16 * N + 4 * N + 4 * N
    assert totals["optimizer step"] == 16 * N + 4 * N + 4 * N


def test_one_fp32_rank_under_zero0_has_no_all_reduce_copy():
    # weights 4N and Adam 8N; the gradients 4N, and with more than one rank their flat all-reduce copy 4N.
    assert state_totals([], 1)["gradient reduction"] == 16 * N
    assert state_totals([], 2)["gradient reduction"] == 20 * N
    # bf16 keeps DeepSpeed's path: 14N resident, the bf16 gradients 2N and their copy 2N.
    assert state_totals(["trainer.precision=bf16"], 1)["gradient reduction"] == 18 * N


# -- activations against what autograd saves and what the allocator holds ----------------------------------


def _saved_storages(out: torch.Tensor, exclude: set[int]) -> dict[int, int]:
    """Bytes of every storage the autograd graph behind ``out`` saved, each storage once."""
    seen: dict[int, int] = {}
    stack, visited = [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for attr in dir(fn):
            if not attr.startswith("_saved_"):
                continue
            value = getattr(fn, attr)
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in exclude:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("lora", [0, 3])
def test_a_block_saves_exactly_what_the_planner_counts(dtype, packed, lora):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=80, max_seq_len=512,
                      lora=LoRAConfig(rank=lora, targets=["wq", "wo", "w2"]) if lora else LoRAConfig())
    block = Block(cfg).to(dtype)
    rows, length = 3, 37
    cos, sin = rotary_tables(length, cfg.head_dim, 1e4)
    packing = None
    if packed:
        cu = torch.arange(0, rows * length + 1, length, dtype=torch.int32)
        packing = Packing.from_cu_seqlens(cu, rows * length, build_chunks=True)
        cos, sin = cos[packing.positions], sin[packing.positions]
        x = torch.randn(1, rows * length, cfg.dim, dtype=dtype, requires_grad=True)
    else:
        x = torch.randn(rows, length, cfg.dim, dtype=dtype, requires_grad=True)
    out = block(x, cos, sin, packing)
    # The rotary tables are shared by every block of a forward and the weights are not activations.
    exclude = {t.untyped_storage().data_ptr() for t in (cos, sin, *block.parameters())}
    saved = sum(_saved_storages(out, exclude).values())
    e = 2 if dtype == torch.bfloat16 else 4
    scalings = 8 * len(cfg.lora.targets) if lora else 0  # each adapter's alpha / r, saved as a 0-d double
    assert saved == plan.layer_activation_bytes(cfg, e, rows * length, rows * length if packed else 0) + scalings  # 3 x 37 tokens: one chunk, one 111 x 111 mask


def _allocated_peak(fn) -> int:
    """Peak bytes allocated during ``fn()`` above what was allocated before (torch's profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = top = 0
    for _, n in events:
        now += n
        top = max(top, now)
    return top


@pytest.mark.parametrize("dtype, packed, ckpt, head, loss, shape", [
    (torch.float32, False, False, "loss", "eager", dict(vocab=2048, dim=64, ffn=160, rows=4, length=256)),
    (torch.float32, False, False, "logprobs", "eager", dict(vocab=2048, dim=64, ffn=160, rows=4, length=256)),
    (torch.bfloat16, True, True, "loss", "eager", dict(vocab=2048, dim=64, ffn=160, rows=4, length=256)),
    (torch.float32, False, False, "loss", "eager", dict(vocab=128, dim=128, ffn=352, rows=8, length=128)),
    (torch.float32, True, True, "loss", "eager", dict(vocab=128, dim=128, ffn=352, rows=8, length=128)),
    (torch.bfloat16, False, False, "loss", "eager", dict(vocab=128, dim=128, ffn=352, rows=8, length=128)),
    (torch.float32, False, False, "loss", "fused", dict(vocab=512, dim=64, ffn=160, rows=2, length=64)),
], ids=["head-heavy", "head-heavy-logprobs", "head-heavy-bf16-packed-ckpt", "block-heavy", "block-heavy-packed-ckpt",
        "block-heavy-bf16", "fused-loss"])
def test_activation_peak_matches_the_allocator(dtype, packed, ckpt, head, loss, shape):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=shape["vocab"], dim=shape["dim"], n_layers=4, n_heads=4, n_kv_heads=2,
                      ffn_dim=shape["ffn"], max_seq_len=4096, activation_checkpointing=ckpt, loss=loss)
    model = Transformer(cfg).to(dtype).train()
    rows, length = shape["rows"], shape["length"]
    ids = torch.randint(0, cfg.vocab_size, (rows, length))
    kwargs = {}
    if packed:
        ids = ids.reshape(1, rows * length)
        kwargs["cu_seqlens"] = torch.arange(0, rows * length + 1, length, dtype=torch.int32)

    def step():
        if head == "loss":
            model(ids, labels=ids, **kwargs).backward()
        else:
            logp, entropy = model(ids, labels=ids, logprobs_temperature=1.0, **kwargs)
            (logp.sum() + entropy.sum()).backward()

    step()  # the weights' gradients exist from here on: the measured step accumulates into them in place
    measured = _allocated_peak(step)
    e = 2 if dtype == torch.bfloat16 else 4
    micro = plan.Micro(1, rows * length, True, head) if packed else plan.Micro(rows, length, False, head)
    planned = plan.activation_peak(plan.activation_bytes(cfg, e, micro, ckpt))
    assert abs(planned / measured - 1) <= 0.10, (planned, measured)


# -- the command line --------------------------------------------------------------------------------------------


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        plan.main(list(argv))
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_report_holds_the_parts_and_the_peak(capsys):
    code, out, _ = run_main(capsys, *HAND, "--devices", "2", "--device-memory", "80GB", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["verdict"] == "fits" and data["devices"] == 2 and data["peak_bytes"] == max(data["phases"].values())
    assert {"resident", "forward/backward", "gradient reduction", "optimizer step", "export"} <= set(data["phases"])
    assert data["activations"]["model"]["with_checkpointing"] < data["activations"]["model"]["without_checkpointing"]
    assert data["step_time"]["seconds"] is None and "no benchmark row for this device/shape" in data["step_time"]["why"]


def test_a_run_that_does_not_fit_names_one_setting_that_does(capsys):
    # A 1B-parameter model in fp32 on 8 devices of 16 GB: ZeRO-0 holds 16 bytes per parameter on each.
    args = ["model=llama-1b", "model.activation_checkpointing=false", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=8", "data.seq_len=1024", "--devices", "8", "--device-memory", "16GB"]
    code, out, _ = run_main(capsys, *args)
    assert code == 0
    verdict = out.strip().splitlines()[-1]
    assert "DOES NOT FIT; it would fit with " in verdict, out
    setting = verdict.split("it would fit with ")[1].split(" (")[0]
    fixed = plan.plan_run(plan.compose([a for a in args if "=" in a and not a.startswith("-")] + [setting]),
                          plan.Target("cuda", 8))
    assert fixed.peak()[0] <= (1 - plan.HEADROOM) * 16e9
    code, out, _ = run_main(capsys, *args[:-1], "4TB")
    assert code == 0 and "FITS" in out.strip().splitlines()[-1]


def test_bad_input_is_one_line(capsys):
    code, _, err = run_main(capsys, "trainer.micro_batch_sise=2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "micro_batch_size" in err
    code, _, err = run_main(capsys, "--device-memory", "80 furlongs")
    assert code == 2 and "--device-memory" in err
    code, _, err = run_main(capsys, "trainer.micro_batch_size=3", "trainer.global_batch_size=6", "--devices", "4")
    assert code == 2 and "not divisible" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(capsys, "stage=sft", "model.init_from=org/some-model")
    assert code == 2 and "hub name" in err
    code, _, err = run_main(capsys, "stage=grpo", "model.init_from=/nowhere", "grpo.rollout_batch_size=12",
                            "grpo.group_size=4", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
                            "--devices", "2")
    assert code == 2 and "grpo.rollout_batch_size=12 must be a multiple of 8" in err


def test_step_time_from_a_benchmark_row(tmp_path, capsys):
    config = plan.compose(HAND)
    params = plan.plan_run(config, plan.Target("cuda", 2)).params
    row = {"bench": "train_throughput", "device": "NVIDIA H100 80GB HBM3", "params": params, "seq_len": 64,
           "micro_batch": 8, "precision": "fp32", "deepspeed_config": "zero0", "world_size": 2,
           "tokens_per_sec_per_device": 1000.0, "smoke": False}
    # After it (the newest row wins), rows that must not be taken for it: a smoke run, and stages.py's rows of
    # a peer (TRL) and of another kernel choice.
    peer = {**row, "bench": None, "subject": "stages", "stage": "pretrain", "zero_stage": 0, "impl": "trl",
            "kernels": "sdpa", "tokens_per_sec_per_device": 5000.0}
    (tmp_path / "train_throughput-h100.json").write_text(json.dumps(
        [row, {**row, "smoke": True, "tokens_per_sec_per_device": 5000.0}, peer,
         {**peer, "impl": "llmsys", "kernels": "triton"}]))
    code, out, _ = run_main(capsys, *HAND, "--devices", "2", "--device-name", "H100", "--benchmarks", str(tmp_path),
                            "--json")
    step = json.loads(out)["step_time"]
    # 16 sequences of 64 tokens per step over 2 devices at 1000 tokens/s per device
    assert code == 0 and step["seconds"] == pytest.approx(16 * 64 / 2 / 1000.0)
    code, out, _ = run_main(capsys, *HAND, "trainer.precision=bf16", "--devices", "2", "--device-name", "H100",
                            "--benchmarks", str(tmp_path), "--json")
    assert json.loads(out)["step_time"]["seconds"] is None


def test_online_stages_count_generation_and_the_frozen_models():
    base = [*HAND, "data.seq_len=64", "model.init_from=/does/not/exist", "trainer.micro_batch_size=4",
            "trainer.global_batch_size=8"]
    ppo = plan.plan_run(plan.compose(["stage=ppo", *base, "ppo.reward_model=/does/not/exist/either",
                                      "ppo.rollout_batch_size=16", "ppo.max_new_tokens=16"]), plan.Target("cuda", 2))
    names = [p.name for p in ppo.parts]
    assert any(n.startswith("reference: parameters") for n in names)
    assert any(n.startswith("reward model: parameters") for n in names)
    assert any(n.startswith("critic: Adam") for n in names) and set(ppo.activations) == {"actor", "critic"}
    cache = next(p for p in ppo.parts if "KV cache" in p.name)
    # 8 rows per device, 64 positions, 2 blocks, keys and values of 2 heads x 16, fp32
    assert cache.bytes == 8 * 64 * 2 * 2 * 2 * 16 * 4
    grpo = plan.plan_run(plan.compose(["stage=grpo", *base, "grpo.kl_coef=0", "grpo.rollout_batch_size=16",
                                       "grpo.group_size=4"]), plan.Target("cuda", 2))
    assert not any("reference" in p.name or "critic" in p.name for p in grpo.parts)
    offloaded = plan.plan_run(plan.compose(["stage=grpo", *base, "grpo.offload_frozen=true", "deepspeed=zero3_offload",
                                            "grpo.rollout_batch_size=16"]), plan.Target("cuda", 2))
    host = {p.name for p in offloaded.parts if p.host}
    assert any(n.startswith("reference: parameters") for n in host) and any("Adam" in n for n in host)


# -- real CPU runs -----------------------------------------------------------------------------------------------

COMMON = ["trainer.max_steps=3", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1",
          "logger.progress=false", "data.seq_len=256"]
# 78M parameters: fp32 weights and Adam alone take 0.93 GB, well above the ~0.57 GB runtime of a process.
BIG = ["data.bpe_vocab_size=512", "model.max_seq_len=256", "model.dim=1024", "model.n_layers=6", "model.n_heads=8",
       "model.n_kv_heads=8", "model.ffn_dim=2816"]
TINY = ["data.bpe_vocab_size=512", "model.max_seq_len=256", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=4", "model.ffn_dim=128"]


def _hwm(pid: int) -> int:
    """The kernel's high-water mark of a process's RSS (VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_per_rank(cmd: list[str], env: dict, timeout: float = 900) -> list[int]:
    """Run ``cmd`` and return each training rank's peak RSS: psutil walks the process tree every 50 ms and
    reads each rank's VmHWM (exact up to that moment, so only the last 50 ms before a rank exits can be
    missed). Ranks are the ``llmsys.train`` processes that are neither torchrun's agent nor forked by a rank."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
    reader.start()
    root, peaks, started = psutil.Process(proc.pid), {}, time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - started > timeout:
            proc.kill()
            raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s")
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                cmdline, parent = p.cmdline(), p.parent()
                parent_cmdline = parent.cmdline() if parent is not None else []
            except psutil.Error:
                continue
            is_train = "llmsys.train" in cmdline and "torch.distributed.run" not in cmdline
            forked = "llmsys.train" in parent_cmdline and "torch.distributed.run" not in parent_cmdline
            if is_train and not forked:
                peaks[p.pid] = max(peaks.get(p.pid, 0), _hwm(p.pid))
        time.sleep(0.05)
    reader.join(10)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{(output or [''])[0][-4000:]}"
    return sorted(peaks.values())


@pytest.mark.slow
def test_planned_peak_rss_of_real_cpu_runs(tmp_path):
    """Pre-training and SFT, ZeRO 0 and 2, on 1 and 2 gloo processes, of a 78M-parameter model, plus a tiny
    model whose peak is the runtime of a process: every rank's peak RSS within RSS_TOLERANCE of the plan."""
    from llmsys.data import data_cache_root, prepare_pretrain_data, prepare_sft_data
    from llmsys.trainers.components import model_tokenizer

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    export = tmp_path / "pretrain-zero0-1" / "final"
    runs = [  # name, processes, overrides; the first pre-training run writes the export SFT starts from
        ("tiny-zero0-1", 1, [*COMMON, *TINY, "trainer.micro_batch_size=2", "trainer.global_batch_size=2"]),
        ("pretrain-zero0-1", 1, [*COMMON, *BIG, "trainer.micro_batch_size=2", "trainer.global_batch_size=2"]),
        ("pretrain-zero2-2", 2, [*COMMON, *BIG, "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
                                 "deepspeed=zero2"]),
        ("sft-zero2-1", 1, [*COMMON, "stage=sft", "data=chat", f"model.init_from={export}",
                            "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "deepspeed=zero2"]),
        ("sft-zero0-2", 2, [*COMMON, "stage=sft", "data=chat", f"model.init_from={export}",
                            "trainer.micro_batch_size=4", "trainer.global_batch_size=8"]),
    ]
    # Tokenise once here, so that no measured run trains a tokenizer or fills a cache.
    pretrain = plan.compose(runs[1][2])
    prepare_pretrain_data(pretrain.data, data_cache_root(pretrain.data))
    results = []
    for name, nproc, overrides in runs:
        if name.startswith("sft") and not results[-1][0].startswith("sft"):
            sft = plan.compose(overrides)
            prepare_sft_data(sft.data, data_cache_root(sft.data), tokenizer=model_tokenizer(sft))
        overrides = [*overrides, f"trainer.output_dir={tmp_path / name}"]
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        cmd = ["nice", "-n", "19", sys.executable, *launcher, "-m", "llmsys.train", *overrides]
        measured = peak_rss_per_rank(cmd, env)
        assert len(measured) == nproc, (name, measured)
        planned, phase = plan.plan_run(plan.compose(overrides), plan.Target("cpu", nproc)).peak()
        results.append((name, planned, phase, measured))
        shutil.rmtree(tmp_path / name / "checkpoints")  # ~1 GB each; the export SFT starts from stays
    table = "\n".join(f"{name:18s} planned {planned / 1e9:.3f} GB ({phase}), measured "
                      f"{', '.join(f'{m / 1e9:.3f}' for m in measured)} GB: {max(measured) / planned - 1:+.1%}"
                      for name, planned, phase, measured in results)
    print(table)
    for name, planned, _, measured in results:
        for rank_peak in measured:
            assert abs(rank_peak / planned - 1) <= plan.RSS_TOLERANCE, (
                f"{name} outside ±{plan.RSS_TOLERANCE:.0%}:\n{table}")
