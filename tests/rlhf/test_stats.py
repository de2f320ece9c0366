"""Batch statistics with a pluggable reduction: hand-worked values on one process, and the same numbers when
the batch is split over two gloo processes (llmsys.distributed.all_reduce_sum as the reduction)."""
from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llmsys.rlhf.stats import RunningMoments, local_sum, masked_moments, masked_whiten

X = torch.tensor([[1.0, 3.0, 100.0, 4.0], [5.0, -50.0, 7.0, 2.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
KEPT = [1.0, 3.0, 4.0, 5.0, 7.0, 2.0]


def test_masked_moments_are_the_unmasked_mean_and_biased_variance():
    mean, var, count = masked_moments(X, MASK)
    assert count == 6
    assert mean == pytest.approx(sum(KEPT) / 6)  # 22 / 6
    assert var == pytest.approx(sum((v - 22 / 6) ** 2 for v in KEPT) / 6)


@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_whiten_matches_hand_values(unbiased):
    mean = sum(KEPT) / 6
    var = sum((v - mean) ** 2 for v in KEPT) / (5 if unbiased else 6)
    out = masked_whiten(X, MASK, unbiased=unbiased)
    assert out[MASK.bool()].tolist() == pytest.approx([(v - mean) / math.sqrt(var) for v in KEPT], abs=1e-5)
    assert out[0, 2].item() == pytest.approx((100.0 - mean) / math.sqrt(var), rel=1e-5)  # masked: computed, kept
    kept_scale = masked_whiten(X, MASK, shift_mean=False, unbiased=unbiased)
    assert kept_scale[MASK.bool()].tolist() == pytest.approx([(v - mean) / math.sqrt(var) + mean for v in KEPT],
                                                             abs=1e-5)


def test_running_moments_equal_the_moments_of_everything_seen():
    moments = RunningMoments()
    seen: list[float] = []
    for batch in ([1.0, 2.0, 4.0], [10.0, -3.0], [0.5, 0.5, 7.0, 8.0]):
        moments.update(torch.tensor(batch))
        seen += batch
        mean = sum(seen) / len(seen)
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(mean)
        assert moments.var == pytest.approx(sum((v - mean) ** 2 for v in seen) / len(seen))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict() and restored.std == pytest.approx(math.sqrt(moments.var))


def test_reduce_is_what_joins_the_shards():
    top, bottom = (X[:1], MASK[:1]), (X[1:], MASK[1:])
    other = torch.stack([(bottom[0] * bottom[1]).sum(), (bottom[0] ** 2 * bottom[1]).sum(), bottom[1].sum()]).double()
    joined = masked_moments(*top, reduce=lambda v: v + other)
    assert joined == pytest.approx(masked_moments(X, MASK))
    assert local_sum(other) is other


def _two_ranks(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from llmsys.distributed import all_reduce_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x, mask = X[rank:rank + 1], MASK[rank:rank + 1]
        moments = RunningMoments(all_reduce_sum)
        moments.update(x[mask.bool()])
        results[rank] = {"whitened": masked_whiten(x, mask, unbiased=False, reduce=all_reduce_sum),
                         "moments": moments.state_dict()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_ranks, args=(port, results), nprocs=2, join=True)
        results = dict(results)
    whole = masked_whiten(X, MASK, unbiased=False)
    torch.testing.assert_close(torch.cat([results[0]["whitened"], results[1]["whitened"]]), whole)
    single = RunningMoments()
    single.update(X[MASK.bool()])
    for rank in (0, 1):
        assert results[rank]["moments"] == pytest.approx(single.state_dict())
