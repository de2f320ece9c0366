"""LoRA (llmsys.models.lora): adapters start at the base model, train alone, and merge exactly."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from llmsys.config import (
    ConfigError,
    LoRAConfig,
    ModelConfig,
    unknown_override_error,
)
from llmsys.distributed import param_groups
from llmsys.distributed.engine import load_initial_weights
from llmsys.models import Transformer
from llmsys.models.lora import (
    LoRALinear,
    is_lora_param,
    lora_parameter_count,
    merge_lora_state,
)

BASE = {"dim": 96, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2, "ffn_dim": 160, "vocab_size": 211, "max_seq_len": 32}
CASES = [
    {"lora": {"rank": 4}},  # default targets: the attention projections
    {"lora": {"rank": 3, "alpha": 5.0, "targets": ["w1", "w2", "w3"]}, "tie_embeddings": True},
    {"lora": {"rank": 7, "alpha": 32.0, "targets": ["wq", "wv", "w2"]}, "qkv_bias": True},
]


def _cfg(case: dict) -> ModelConfig:
    kw = dict(BASE, **case)
    return ModelConfig(**dict(kw, lora=LoRAConfig(**kw["lora"])))


def _targeted(cfg: ModelConfig) -> list[str]:
    """Base weight names of the targeted projections, e.g. layers.1.feed_forward.w2.weight."""
    owner = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
             "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
    return [f"layers.{i}.{owner[t]}.{t}.weight" for i in range(cfg.n_layers) for t in cfg.lora.targets]


def _lora_model(cfg: ModelConfig, seed: int = 0) -> tuple[Transformer, Transformer]:
    """A base model and the LoRA model built on its weights (adapters at their constructor init)."""
    torch.manual_seed(seed)
    base = Transformer(dataclasses.replace(cfg, lora=LoRAConfig())).eval()
    model = Transformer(cfg).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(is_lora_param(n) for n in missing)
    return base, model


def _randomise_adapters(model: Transformer) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_param(name):
                p.normal_(0.0, 0.3)


@pytest.mark.parametrize("case", CASES)
def test_only_adapters_train_and_are_counted(case):
    cfg = _cfg(case)
    _, model = _lora_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {w.replace(".weight", f".{a}") for w in _targeted(cfg) for a in ("lora_A", "lora_B")}
    assert trainable == expected
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == lora_parameter_count(cfg)
    for name in _targeted(cfg):
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(module, LoRALinear) and module.lora_A.shape[0] == cfg.lora.rank
        assert torch.count_nonzero(module.lora_A) > 0 and torch.count_nonzero(module.lora_B) == 0
    # ZeRO's optimizers get the adapters only, as matrices with weight decay, and no empty group.
    groups = param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in groups[0]["params"]} == {id(p) for n, p in model.named_parameters() if n in expected}


@pytest.mark.parametrize("case", CASES)
def test_lora_at_init_is_the_base_model(case):
    cfg = _cfg(case)
    base, model = _lora_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0: the update is exactly zero


@pytest.mark.parametrize("case", CASES)
def test_merge_is_base_plus_scaled_product(case):
    cfg = _cfg(case)
    _, model = _lora_model(cfg)
    _randomise_adapters(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_lora_state(state, cfg)
    assert not any(is_lora_param(k) for k in merged)
    assert set(merged) == {k for k in state if not is_lora_param(k)}
    targeted = set(_targeted(cfg))
    for name, tensor in merged.items():
        if name in targeted:
            prefix = name[: -len(".weight")]
            a, b = state[f"{prefix}.lora_A"].double(), state[f"{prefix}.lora_B"].double()
            expected = state[name].double() + (cfg.lora.alpha / cfg.lora.rank) * (b @ a)
            assert not torch.equal(tensor, state[name]), name
            torch.testing.assert_close(tensor.double(), expected, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(tensor, state[name]), name
    # A merged state loads strictly into the plain model and computes what the adapted model does.
    plain = Transformer(dataclasses.replace(cfg, lora=LoRAConfig())).eval()
    plain.load_state_dict(merged)
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_merge_refuses_a_rank_mismatch_and_orphans():
    cfg = _cfg(CASES[0])
    _, model = _lora_model(cfg)
    state = model.state_dict()
    with pytest.raises(ValueError, match="rank 4"):
        merge_lora_state(state, dataclasses.replace(cfg, lora=LoRAConfig(rank=8)))
    orphan = {k: v for k, v in state.items() if not k.endswith("layers.0.attention.wq.lora_A")}
    with pytest.raises(KeyError, match="without their lora_A"):
        merge_lora_state(orphan, cfg)
    plain = {k: v for k, v in state.items() if not is_lora_param(k)}
    assert merge_lora_state(plain, cfg).keys() == plain.keys()


def test_training_changes_only_the_adapters_and_the_merge_matches():
    every = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    cfg = _cfg({"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": every}, "qkv_bias": True})
    _, model = _lora_model(cfg, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (3, 17))
        loss = model(ids, labels=ids.roll(-1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if is_lora_param(name):
            assert not torch.equal(p, before[name]), name
        else:
            assert p.grad is None and torch.equal(p, before[name]), name
    model.eval()
    plain = Transformer(dataclasses.replace(cfg, lora=LoRAConfig())).eval()
    plain.load_state_dict(merge_lora_state(model.state_dict(), cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids), atol=1e-5, rtol=1e-5)


def test_engine_loads_a_base_state_into_a_lora_model():
    cfg = _cfg(CASES[2])
    base, _ = _lora_model(cfg)
    torch.manual_seed(5)
    model = Transformer(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if is_lora_param(n)}
    def load(state):  # what Engine does before DeepSpeed wraps the model (ZeRO-2: parameters whole)
        load_initial_weights(model, state, zero3=False, fresh_param=is_lora_param)

    load(base.state_dict())
    for name, p in model.named_parameters():
        expected = init[name] if is_lora_param(name) else base.state_dict()[name]
        assert torch.equal(p, expected), name
    lacking = {k: v for k, v in base.state_dict().items() if k != "norm.weight"}
    with pytest.raises(KeyError, match="norm.weight"):
        load(lacking)


@pytest.mark.parametrize("kw,key", [
    ({"rank": -1}, "model.lora.rank"),
    ({"rank": 4, "alpha": 0.0}, "model.lora.alpha"),
    ({"rank": 4, "dropout": 1.0}, "model.lora.dropout"),
    ({"rank": 4, "targets": ["wq", "wq"]}, "model.lora.targets"),
    ({"rank": 4, "targets": []}, "model.lora.targets"),
])
def test_invalid_lora_config_names_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        LoRAConfig(**kw)


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model\.lora\.targets: got 'q_proj', expected one of wq, wk, wv, wo, w1"):
        LoRAConfig(rank=4, targets=["wq", "q_proj"])


def test_exported_config_round_trips_with_and_without_lora():
    cfg = _cfg(CASES[2])
    meta = dataclasses.asdict(cfg)
    assert isinstance(meta["lora"], dict)
    assert ModelConfig(**meta) == cfg  # the dict read back from config.json becomes a LoRAConfig
    del meta["lora"]  # an export written before LoRA existed
    assert ModelConfig(**meta).lora == LoRAConfig()


def test_hydra_overrides_reach_the_nested_config():
    from tests.config.test_config import _compose

    cfg = _compose(["model.lora.rank=8", "model.lora.targets=[wq,wv]", "model.lora.alpha=4"])
    assert cfg.model.lora == LoRAConfig(rank=8, alpha=4.0, targets=["wq", "wv"])
    assert _compose([]).model.lora.rank == 0
    with pytest.raises(ConfigError, match=r"model\.lora\.targets"):
        _compose(["model.lora.rank=8", "model.lora.targets=[wq,bogus]"])
    msg = unknown_override_error(["model.lora.rnk=8"])
    assert "model.lora.rnk" in msg and "rank" in msg and "targets" in msg
    assert unknown_override_error(["model.lora.rank=8", "model.lora.targets=[w1]"]) is None
