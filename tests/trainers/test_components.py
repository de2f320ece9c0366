"""The shared trainer parts that need no model: equal work per rank, resume choice, named sums."""
from __future__ import annotations

import pytest
import torch

from llmsys.distributed import DistInfo
from llmsys.distributed.engine import TRAINER_STATE, write_manifest
from llmsys.trainers.components import equal_share, every_rank_finished, prepare_on_local_main, reduce_sums, resume_path


def ranks(world: int) -> list[DistInfo]:
    return [DistInfo(rank, world, rank, world, torch.device("cpu")) for rank in range(world)]


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 2), (2, 3)])
def test_every_item_lands_on_exactly_one_rank_and_shares_have_one_length(n, world):
    items = list(range(100, 100 + n))
    shares = [equal_share(items, d, every_item=True) for d in ranks(world)]
    assert len({len(share) for share, _ in shares}) == 1
    real = [x for share, n_real in shares for x in share[:n_real]]
    assert sorted(real) == items
    for share, n_real in shares:
        assert all(x == items[0] for x in share[n_real:])  # filler, never counted


@pytest.mark.parametrize("n,world,expected", [
    (10, 3, [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),  # the remainder (9) is left out
    (4, 2, [[0, 1], [2, 3]]),
    (1, 2, [[0], [0]]),  # fewer items than ranks: wrap around
])
def test_a_sample_is_split_evenly(n, world, expected):
    assert [equal_share(range(n), d, every_item=False)[0] for d in ranks(world)] == expected


def test_no_items():
    assert equal_share([], ranks(2)[1], every_item=True) == ([], 0)


def test_single_process_collectives_are_local():
    assert reduce_sums({"a": torch.tensor(1.5), "b": torch.tensor([2.0]), "n": torch.tensor(3)}) == \
        {"a": 1.5, "b": 2.0, "n": 3.0}
    assert every_rank_finished(torch.tensor([True, True])) and not every_rank_finished(torch.tensor([True, False]))
    assert prepare_on_local_main(ranks(1)[0], lambda: {"path": "x"}) == {"path": "x"}


def test_resume_choices(tmp_path):
    root = tmp_path / "checkpoints"
    assert resume_path("none", root) is None and resume_path("auto", root) is None
    step = root / "step_3"
    step.mkdir(parents=True)
    (root / "latest").write_text("step_3")
    (step / TRAINER_STATE).write_text('{"step": 3, "world_size": 1, "zero_stage": 0}')
    write_manifest(step)
    assert resume_path("auto", root) == step
    with pytest.raises(FileExistsError, match="trainer.resume=auto"):
        resume_path("none", root)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resume_path(str(tmp_path / "missing"), root)
    assert resume_path(str(step), root) == step
