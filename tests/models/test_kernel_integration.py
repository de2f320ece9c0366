"""The model with llmsys's Triton kernels (interpreted on CPU) must train like the PyTorch reference path."""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from llmsys.config import ConfigError, ModelConfig  # noqa: E402
from llmsys.models import Transformer  # noqa: E402

BASE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=131, max_seq_len=64)


def _model(attention: str, loss: str, seed: int = 0, **ops: str) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(dataclasses.replace(BASE, attention=attention, loss=loss, **ops))


def _train(model: Transformer, batches: list[torch.Tensor], steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def _batches(n: int, batch: int = 2, seq: int = 33) -> list[torch.Tensor]:
    # Repetitive sequences, so a few steps visibly reduce the loss.
    g = torch.Generator().manual_seed(7)
    base = torch.randint(0, BASE.vocab_size, (n, batch, 8), generator=g)
    return list(base.repeat(1, 1, 5)[:, :, :seq])


def test_triton_and_fused_loss_train_like_sdpa_and_eager():
    batches = _batches(3)
    reference = _train(_model("sdpa", "eager"), batches, steps=6)
    fused = _train(_model("triton", "fused"), batches, steps=6)
    assert reference[-1] < reference[0] - 0.3  # it really trained
    for step, (a, b) in enumerate(zip(reference, fused)):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), (step, reference, fused)


def test_csrc_fused_ops_train_like_the_torch_ops():
    # llmsys._C's RMSNorm (+ fused residual add), rotary and SwiGLU: CPU twins here, CUDA on a GPU.
    batches = _batches(3)
    reference = _train(_model("sdpa", "eager"), batches, steps=6)
    fused = _train(_model("sdpa", "eager", norm="fused", rope="fused", mlp="fused"), batches, steps=6)
    assert reference[-1] < reference[0] - 0.3
    for step, (a, b) in enumerate(zip(reference, fused)):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), (step, reference, fused)


@pytest.mark.parametrize("ops", [dict(norm="fused"), dict(rope="fused"), dict(mlp="fused")])
def test_each_csrc_op_alone_matches_the_reference_gradients(ops):
    ids = _batches(1)[0]
    ref, alt = _model("sdpa", "eager"), _model("sdpa", "eager", **ops)
    ref(ids[:, :-1], labels=ids[:, 1:]).backward()
    alt(ids[:, :-1], labels=ids[:, 1:]).backward()
    for (name, p), q in zip(ref.named_parameters(), alt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention,loss", [("triton", "eager"), ("sdpa", "fused")])
def test_each_kernel_alone_matches_the_reference_gradients(attention, loss):
    ids = _batches(1)[0]
    ref, alt = _model("sdpa", "eager"), _model(attention, loss)
    ref(ids[:, :-1], labels=ids[:, 1:]).backward()
    alt(ids[:, :-1], labels=ids[:, 1:]).backward()
    for (name, p), q in zip(ref.named_parameters(), alt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_packed_row_equals_separate_sequences(attention):
    model = _model(attention, "eager").eval()
    lengths = [7, 1, 19, 13]
    ids = torch.randint(0, BASE.vocab_size, (1, sum(lengths)))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu)
        separate = torch.cat([model(ids[:, int(a):int(b)]) for a, b in zip(cu[:-1], cu[1:])], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-5)


def test_packed_gradients_match_between_sdpa_and_triton():
    lengths = [5, 22, 9]
    ids = torch.randint(0, BASE.vocab_size, (1, sum(lengths) + 1))
    cu = torch.tensor([0, 5, 27, 36], dtype=torch.int32)
    ref, tri = _model("sdpa", "eager"), _model("triton", "fused")
    ref(ids[:, :-1], labels=ids[:, 1:], cu_seqlens=cu).backward()
    tri(ids[:, :-1], labels=ids[:, 1:], cu_seqlens=cu).backward()
    for (name, p), q in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_packing_is_refused():
    model = _model("sdpa", "eager")
    ids = torch.randint(0, BASE.vocab_size, (1, 10))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids.repeat(2, 1), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attn_without_the_package_fails_at_config_time():
    with pytest.raises(ConfigError, match="model.attention.*flash-attn package"):
        ModelConfig(attention="flash_attn")
