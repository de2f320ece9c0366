"""llmsys/kernels/cross_entropy.py against its float64 references.

CPU runs use Triton's interpreter (conftest sets TRITON_INTERPRET=1) with the chunk budget and
vocab block forced small, so every case crosses several token chunks, several vocab blocks and
several grad_weight slices. Half precision is judged against PyTorch's own error in that dtype.
"""
import pytest
import torch

# The module, not the package: llmsys.kernels re-exports lazily, and tests monkeypatch constants here.
from llmsys.kernels import cross_entropy as ce
from llmsys.kernels.cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
    linear_logprobs,
    linear_logprobs_ref,
)

IGNORE = -100
CHUNK_ROWS = 7  # tokens per chunk in the CPU tests: 130 tokens -> 19 chunks
# Vocab block in the CPU tests: V = 301 -> 3 blocks of 128, V = 4099 -> 5 blocks of 1024 (the
# interpreter costs ~0.1 ms per block op, so 33 blocks of 128 at V = 4099 took 20-40 s per test).
def _block_v(V: int) -> int:
    return 128 if V < 1024 else 1024


FP32_RTOL = 5e-6  # max |err| <= FP32_RTOL * max |ref| + FP32_ATOL
FP32_ATOL = 1e-7
HALF_EPS_ULPS = 0.01  # the "small epsilon" of the half-precision criterion, in ulps of max |ref|


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many token chunks, vocab blocks and grad_weight slices; returns a setter for the chunk."""
    monkeypatch.setattr(ce, "GRAD_WEIGHT_SLICE_BYTES", 1000)  # 31 vocab rows at H=16, 10 at H=48

    def set_chunk_rows(rows: int, V: int, dtype: torch.dtype) -> None:
        monkeypatch.setattr(ce, "BLOCK_V_MAX", _block_v(V))
        elt = torch.finfo(dtype).bits // 8
        monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", rows * V * elt)
        assert ce._chunk_rows(10**6, V, dtype) == rows

    return set_chunk_rows


def make_inputs(N, V, H, seed, *, ignore=None, lead=None):
    """fp64 hidden (N, H), weight (V, H) with logits of std ~2, targets (N,) int64."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (2.0 / H**0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore == "some":
        targets[torch.rand(N, generator=g) < 0.3] = IGNORE
        targets[0] = IGNORE
    elif ignore == "all":
        targets[:] = IGNORE
    if lead is not None:
        hidden, targets = hidden.reshape(*lead, H), targets.reshape(lead)
    return hidden, weight, targets


def run(fn, hidden, weight, targets, dtype, upstream=None, **kw):
    """fn on inputs cast to dtype -> (outputs in fp64, grad_hidden, grad_weight, upstream grads)."""
    h = hidden.to(dtype, copy=True).requires_grad_()
    w = weight.to(dtype, copy=True).requires_grad_()
    out = fn(h, w, targets, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    if upstream is None:
        g = torch.Generator().manual_seed(1234)
        upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    loss = sum((o.double() * u).sum() for o, u in zip(outs, upstream))
    loss.backward()
    return [o.detach().double() for o in outs], h.grad.double(), w.grad.double(), upstream


def max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_close_fp32(actual, ref, what):
    tol = FP32_RTOL * (ref.abs().max().item() if ref.numel() else 0.0) + FP32_ATOL
    err = max_err(actual, ref)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def assert_within_torch_error(actual, torch_same_dtype, ref, dtype, what):
    """Kernel's max error vs fp64 <= 2x PyTorch's in the same dtype + HALF_EPS_ULPS ulps of max|ref|."""
    eps = HALF_EPS_ULPS * torch.finfo(dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    err, base = max_err(actual, ref), max_err(torch_same_dtype, ref)
    assert err <= 2 * base + eps, f"{what}: max error {err:.3g} > 2 x torch's {base:.3g} + {eps:.3g}"


def compare(fn, ref_fn, hidden, weight, targets, dtype, *, judge_by_torch=False, **kw):
    """Outputs and grads vs the fp64 reference: tight for fp32, else within 2x torch's own error."""
    # The fp64 reference sees the same dtype-rounded inputs, so errors measure the computation only.
    hidden, weight = hidden.to(dtype).double(), weight.to(dtype).double()
    got = run(fn, hidden, weight, targets, dtype, **kw)
    upstream = got[3]
    want = run(ref_fn, hidden, weight, targets, torch.float64, upstream, **kw)
    names = [f"output{i}" for i in range(len(got[0]))] + ["grad_hidden", "grad_weight"]
    pairs = list(zip(got[0], want[0])) + [(got[1], want[1]), (got[2], want[2])]
    if dtype == torch.float32 and not judge_by_torch:
        for name, (a, r) in zip(names, pairs):
            assert_close_fp32(a, r, name)
        return
    base = run(ref_fn, hidden, weight, targets, dtype, upstream, **kw)
    bases = list(base[0]) + [base[1], base[2]]
    for name, (a, r), b in zip(names, pairs, bases):
        assert_within_torch_error(a, b, r, dtype, name)


# ---------------------------------------------------------------- fused_linear_cross_entropy

SHAPES = [  # (V, N, H)
    (1, 17, 16),
    (301, 1, 48),
    (301, 130, 16),
    (4099, 17, 48),
    (4099, 130, 16),
]


@pytest.mark.parametrize("ignore", [None, "some"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("V,N,H", SHAPES)
def test_cross_entropy_fp32(small_chunks, V, N, H, reduction, ignore):
    small_chunks(CHUNK_ROWS, V, torch.float32)
    hidden, weight, targets = make_inputs(N, V, H, seed=V + N + H, ignore=ignore)
    compare(fused_linear_cross_entropy, fused_linear_cross_entropy_ref, hidden, weight, targets,
            torch.float32, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("V,N,H", [(301, 130, 16), (4099, 17, 48)])
def test_cross_entropy_half(small_chunks, V, N, H, reduction, dtype):
    small_chunks(CHUNK_ROWS, V, dtype)
    hidden, weight, targets = make_inputs(N, V, H, seed=7 * V + N, ignore="some")
    compare(fused_linear_cross_entropy, fused_linear_cross_entropy_ref, hidden, weight, targets,
            dtype, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored_is_zero_not_nan(small_chunks, reduction, dtype):
    small_chunks(CHUNK_ROWS, 301, dtype)
    hidden, weight, targets = make_inputs(17, 301, 16, seed=3, ignore="all")
    outs, gh, gw, _ = run(fused_linear_cross_entropy, hidden, weight, targets, dtype, reduction=reduction)
    assert torch.all(outs[0] == 0)
    assert torch.all(gh == 0) and torch.all(gw == 0)
    ref_outs, *_ = run(fused_linear_cross_entropy_ref, hidden, weight, targets, torch.float64,
                       reduction=reduction)
    assert torch.all(ref_outs[0] == 0)


def test_cross_entropy_batched_shape_and_in_vocab_ignore_index(small_chunks):
    """(B, T, H) input; an ignore_index that is also a vocabulary id (a pad token) is still ignored."""
    small_chunks(CHUNK_ROWS, 301, torch.float32)
    hidden, weight, targets = make_inputs(26, 301, 16, seed=11, lead=(2, 13))
    targets[0, :4] = 5
    targets[1, -3:] = 5
    for reduction in ("mean", "none"):
        loss = fused_linear_cross_entropy(hidden.float(), weight.float(), targets, ignore_index=5,
                                          reduction=reduction)
        assert loss.shape == (() if reduction == "mean" else (2, 13))
        if reduction == "none":
            assert torch.all(loss[targets == 5] == 0) and torch.all(loss[targets != 5] > 0)
    compare(fused_linear_cross_entropy, fused_linear_cross_entropy_ref, hidden, weight, targets,
            torch.float32, ignore_index=5, reduction="none")


def test_cross_entropy_default_launch_constants():
    """No monkeypatching: one chunk, one vocab block, grads written into place directly."""
    hidden, weight, targets = make_inputs(33, 4099, 16, seed=5, ignore="some")
    for dtype in (torch.float32, torch.float16):
        compare(fused_linear_cross_entropy, fused_linear_cross_entropy_ref, hidden, weight, targets,
                dtype, reduction="mean")


def test_cross_entropy_no_grad_and_frozen_inputs(small_chunks):
    small_chunks(CHUNK_ROWS, 301, torch.float32)
    hidden, weight, targets = make_inputs(40, 301, 16, seed=9, ignore="some")
    h, w = hidden.float(), weight.float()
    ref = fused_linear_cross_entropy_ref(hidden, weight, targets)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h.requires_grad_(), w, targets)
    assert not loss.requires_grad
    assert_close_fp32(loss.double(), ref, "no_grad loss")
    # frozen head (e.g. a reference policy's weights): only the hidden gradient
    h = hidden.float().requires_grad_()
    fused_linear_cross_entropy(h, weight.float(), targets, reduction="sum").backward()
    ref_h = hidden.clone().requires_grad_()
    fused_linear_cross_entropy_ref(ref_h, weight, targets, reduction="sum").backward()
    assert_close_fp32(h.grad.double(), ref_h.grad, "grad_hidden, frozen weight")
    # frozen hidden: only the weight gradient
    w = weight.float().requires_grad_()
    fused_linear_cross_entropy(hidden.float(), w, targets, reduction="none").sum().backward()
    ref_w = weight.clone().requires_grad_()
    fused_linear_cross_entropy_ref(hidden, ref_w, targets, reduction="none").sum().backward()
    assert_close_fp32(w.grad.double(), ref_w.grad, "grad_weight, frozen hidden")


def test_cross_entropy_ignores_autocast(small_chunks):
    """Under autocast the GEMMs still run in the inputs' dtype (fp32 here), not autocast's bf16."""
    small_chunks(CHUNK_ROWS, 301, torch.float32)
    hidden, weight, targets = make_inputs(20, 301, 16, seed=37, ignore="some")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(fused_linear_cross_entropy, hidden, weight, targets, torch.float32)
        logp = linear_logprobs(hidden.float(), weight.float(), targets.clamp(min=0))[0]
    want = run(fused_linear_cross_entropy_ref, hidden, weight, targets, torch.float64, got[3])
    for name, a, r in zip(("loss", "grad_hidden", "grad_weight"), (got[0][0], got[1], got[2]),
                          (want[0][0], want[1], want[2])):
        assert_close_fp32(a, r, name)
    assert_close_fp32(logp.double(), linear_logprobs_ref(hidden, weight, targets.clamp(min=0))[0], "logp")


def test_cross_entropy_tied_weight_accumulates_with_embedding(small_chunks):
    """The head weight used as an embedding too: autograd adds both contributions."""
    small_chunks(CHUNK_ROWS, 301, torch.float32)
    _, weight, targets = make_inputs(20, 301, 16, seed=13)
    ids = torch.randint(0, 301, (20,), generator=torch.Generator().manual_seed(0))
    grads = []
    for fn, dtype in ((fused_linear_cross_entropy, torch.float32),
                      (fused_linear_cross_entropy_ref, torch.float64)):
        w = weight.to(dtype, copy=True).requires_grad_()
        hidden = torch.tanh(torch.nn.functional.embedding(ids, w))
        fn(hidden, w, targets).backward()
        grads.append(w.grad.double())
    assert_close_fp32(grads[0], grads[1], "tied grad_weight")


def test_cross_entropy_half_accumulating_in_weight_dtype(small_chunks, monkeypatch):
    """ACCUMULATE_GRAD_WEIGHT_FP32 = False (addmm_ in the weight dtype) still meets the criterion."""
    monkeypatch.setattr(ce, "ACCUMULATE_GRAD_WEIGHT_FP32", False)
    small_chunks(CHUNK_ROWS, 301, torch.float16)
    hidden, weight, targets = make_inputs(130, 301, 16, seed=29, ignore="some")
    compare(fused_linear_cross_entropy, fused_linear_cross_entropy_ref, hidden, weight, targets,
            torch.float16, reduction="sum")


def test_cross_entropy_second_backward_raises():
    """mean/sum scale the stored gradients in place: a retained graph's second backward must fail."""
    hidden, weight, targets = make_inputs(9, 11, 8, seed=31)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(not ce._interpreting(), reason="CPU interpreter only")
def test_interpreter_refuses_bf16_buffers():
    """The interpreter truncates bf16 stores; the op stages bf16 through fp32, the launcher refuses it."""
    logits = torch.randn(3, 17).bfloat16()
    with pytest.raises(ValueError, match="not supported by the kernel"):
        ce._launch_softmax_stats(logits, torch.zeros(3, dtype=torch.long), 1.0,
                                 compute_entropy=False, write_grad=False)


# ---------------------------------------------------------------- linear_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V,N,H", [(1, 17, 16), (301, 130, 48), (4099, 17, 16)])
def test_logprobs_fp32(small_chunks, V, N, H, temperature):
    small_chunks(CHUNK_ROWS, V, torch.float32)
    hidden, weight, targets = make_inputs(N, V, H, seed=V * 3 + N)
    compare(linear_logprobs, linear_logprobs_ref, hidden, weight, targets, torch.float32,
            temperature=temperature)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_half(small_chunks, temperature, dtype):
    small_chunks(CHUNK_ROWS, 301, dtype)
    hidden, weight, targets = make_inputs(130, 301, 16, seed=17)
    compare(linear_logprobs, linear_logprobs_ref, hidden, weight, targets, dtype, temperature=temperature)


@pytest.mark.parametrize("used", ["logp", "entropy"])
def test_logprobs_gradient_through_one_output(small_chunks, used):
    small_chunks(CHUNK_ROWS, 301, torch.float32)
    hidden, weight, targets = make_inputs(30, 301, 16, seed=19, lead=(3, 10))
    grads = []
    for fn, dtype in ((linear_logprobs, torch.float32), (linear_logprobs_ref, torch.float64)):
        h, w = hidden.to(dtype, copy=True).requires_grad_(), weight.to(dtype, copy=True).requires_grad_()
        logp, ent = fn(h, w, targets, temperature=0.7)
        assert logp.shape == ent.shape == (3, 10)
        assert logp.dtype == ent.dtype == torch.promote_types(dtype, torch.float32)
        out = logp if used == "logp" else ent
        (out * torch.linspace(-1, 2, 30, dtype=dtype).reshape(3, 10)).sum().backward()
        grads.append((h.grad.double(), w.grad.double()))
    assert_close_fp32(grads[0][0], grads[1][0], "grad_hidden")
    assert_close_fp32(grads[0][1], grads[1][1], "grad_weight")


def test_logprobs_no_grad_matches(small_chunks):
    small_chunks(CHUNK_ROWS, 301, torch.float32)
    hidden, weight, targets = make_inputs(25, 301, 16, seed=23)
    with torch.no_grad():
        logp, ent = linear_logprobs(hidden.float(), weight.float(), targets, 0.7)
    ref_logp, ref_ent = linear_logprobs_ref(hidden, weight, targets, 0.7)
    assert_close_fp32(logp.double(), ref_logp, "logp")
    assert_close_fp32(ent.double(), ref_ent, "entropy")
    assert torch.all(ent > 0) and torch.all(logp < 0)


# ---------------------------------------------------------------- refusals


def _bad_calls():
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    t = torch.randint(0, 11, (6,))
    CE, LP = fused_linear_cross_entropy, linear_logprobs
    return [
        ("reduction", lambda: CE(h, w, t, reduction="avg"), "reduction must be one of"),
        ("hidden dim", lambda: CE(h, torch.randn(11, 9), t), "last dim 8 != weight's dim 1"),
        ("weight rank", lambda: CE(h, torch.randn(11, 8, 1), t), "weight must be"),
        ("hidden rank", lambda: CE(torch.randn(8), w, t), "hidden must be"),
        ("rows", lambda: CE(h, w, t[:5]), "does not match hidden's leading dims"),
        ("int32 targets", lambda: CE(h, w, t.int()), "targets must be int64"),
        ("dtype mismatch", lambda: CE(h, w.half(), t), "must share a dtype"),
        ("float64", lambda: CE(h.double(), w.double(), t), "unsupported"),
        ("device", lambda: CE(h, w.to("meta"), t), "one device"),
        ("target >= V", lambda: CE(h, w, torch.tensor([0, 1, 11, 2, 3, 4])),
         r"target id 11 is outside .*\[0, 11\)"),
        ("negative target", lambda: CE(h, w, torch.tensor([0, -1, 1, 2, 3, 4])), "target id -1"),
        ("lp ignore id", lambda: LP(h, w, torch.tensor([0, -100, 1, 2, 3, 4])), "target id -100"),
        ("temperature 0", lambda: LP(h, w, t, temperature=0.0), "temperature must be"),
        ("temperature nan", lambda: LP(h, w, t, temperature=float("nan")), "temperature must be"),
        ("lp rows", lambda: LP(h, w, t[:4]), "does not match"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_refuses_bad_inputs(case):
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call()


def test_references_refuse_like_the_kernels():
    h, w = torch.randn(6, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match="target id 11"):
        fused_linear_cross_entropy_ref(h, w, torch.tensor([0, 1, 11, 2, 3, 4]))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy_ref(h, w, torch.zeros(6, dtype=torch.long), reduction="mean_tokens")


# ---------------------------------------------------------------- GPU only (bf16/fp16, larger shapes)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_inputs(N, V, H, seed, ignore=None):
    hidden, weight, targets = make_inputs(N, V, H, seed, ignore=ignore)
    return hidden.cuda(), weight.cuda(), targets.cuda()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_cross_entropy_large(monkeypatch, dtype, reduction):
    V = 32003
    # 300 rows -> 256 (CHUNK_ROW_MULTIPLE): ~1450 valid tokens in 6 chunks, 8 vocab blocks per row.
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 300 * V * torch.finfo(dtype).bits // 8)
    hidden, weight, targets = _gpu_inputs(2065, V, 256, seed=1, ignore="some")
    # fp32 is judged like the half types here: cuBLAS (TF32 or not) sums 32k terms per grad_hidden.
    compare(fused_linear_cross_entropy, fused_linear_cross_entropy_ref, hidden, weight, targets, dtype,
            judge_by_torch=True, reduction=reduction)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_logprobs_large(monkeypatch, dtype):
    V = 32003
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 300 * V * 2)
    hidden, weight, targets = _gpu_inputs(1031, V, 256, seed=2)
    compare(linear_logprobs, linear_logprobs_ref, hidden, weight, targets, dtype, temperature=0.7)


@gpu
def test_gpu_memory_stays_below_full_logits(monkeypatch):
    """Peak extra memory of forward + backward is far below the N x V fp32 logits."""
    N, V, H, dtype = 16384, 65536, 1024, torch.bfloat16
    monkeypatch.setattr(ce, "LOGITS_CHUNK_BYTES", 256 * 2**20)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, H, device="cuda", dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device="cuda", dtype=dtype, generator=g) * H**-0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(hidden, weight, targets).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full_logits = N * V * 4
    bound = (ce.LOGITS_CHUNK_BYTES + V * H * 4 + ce.GRAD_WEIGHT_SLICE_BYTES  # chunk, fp32 acc, slice
             + 2 * (N * H * 2 + V * H * 2)  # grads held + scaled copies (input dtype)
             + 64 * 2**20)  # O(N) vectors, allocator slack
    assert extra <= bound < full_logits, f"peak extra {extra / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB"
