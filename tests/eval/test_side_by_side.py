"""llmsys.eval.side_by_side: every export's greedy answers to the same prompts, checked against a direct greedy
generation of each export, with both scores (rule annotator, exact answer)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from llmsys.config import ModelConfig
from llmsys.data import chat_template_for, train_bpe_tokenizer
from llmsys.eval.probes import format_and_stop_rate, load_export
from llmsys.eval.side_by_side import side_by_side
from llmsys.models import Transformer
from llmsys.models.export import save_pretrained
from llmsys.models.generation import generate
from llmsys.rlhf.rewards import RuleAnnotator, exact_answer
from tests.data.corpora import CHAT_TOKENIZER_TEXT

MAX_NEW = 12
PROMPTS = [[{"role": "user", "content": "What is 2 + 2?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you today?"}],
           [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "jumps"},
            {"role": "user", "content": "over the lazy dog?"}]]
CFG = ModelConfig(name="sbs", dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=80, init_std=0.2,
                  pad_vocab_multiple=32)


def _train_to_answer(model: Transformer, template, answer: str, steps: int = 60) -> None:
    """A few Adam steps on every prompt followed by ``answer`` and the end of turn: a model that stops."""
    examples = []
    for prompt in PROMPTS:
        ids, targets = template.encode([*prompt, {"role": "assistant", "content": answer}])
        labels = [t if keep else -100 for t, keep in zip(ids[1:], targets[1:])]
        examples.append((torch.tensor([ids[:-1]]), torch.tensor([labels])))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        for ids, labels in examples:
            optimizer.zero_grad()
            model(ids, labels).backward()
            optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Two tiny exports with one tokenizer: ``random`` (fresh weights: rambles) and ``answers`` (trained to
    answer "4" and stop)."""
    root = tmp_path_factory.mktemp("side_by_side")
    tokenizer = train_bpe_tokenizer(CHAT_TOKENIZER_TEXT, 300)
    tokenizer_dir = tokenizer.save(root / "tokenizer")
    template = chat_template_for(tokenizer)
    cfg = dataclasses.replace(CFG, vocab_size=((tokenizer.vocab_size + 31) // 32) * 32)
    out = {}
    for seed, name in ((0, "random"), (1, "answers")):
        torch.manual_seed(seed)
        model = Transformer(cfg)
        if name == "answers":
            _train_to_answer(model, template, "4")
        out[name] = save_pretrained(model.state_dict(), cfg, root / name, tokenizer_dir=tokenizer_dir)
    return out


def _direct(export: Path, prompt) -> tuple[list[int], bool, str, bool]:
    """One prompt alone through generate(): ids, stopped, text (without the end of turn), well-formed."""
    model, tokenizer = load_export(export)
    template = chat_template_for(tokenizer)
    out = generate(model, [template.generation_prompt(prompt)], MAX_NEW, temperature=0.0,
                   eos_id=template.end_of_turn_id, pad_id=tokenizer.pad_id)
    ids = out.tokens[0, :int(out.lengths[0])].tolist()
    stopped = bool(ids) and ids[-1] == template.end_of_turn_id
    text = tokenizer.decode(ids[:-1] if stopped else ids)
    return ids, stopped, text, format_and_stop_rate([ids], tokenizer)["well_formed"] == 1.0


def test_answers_match_a_direct_greedy_generation_and_carry_the_annotator_score(exports):
    result = side_by_side(exports, PROMPTS, max_new_tokens=MAX_NEW)
    questions = [p[-1]["content"] for p in PROMPTS]
    assert result["stages"] == ["random", "answers"] and result["prompts"] == questions
    assert result["score_name"] == "annotator" and result["max_new_tokens"] == MAX_NEW
    annotator = RuleAnnotator()
    for stage, export in exports.items():
        assert len(result["answers"][stage]) == len(PROMPTS)
        for question, prompt, answer in zip(questions, PROMPTS, result["answers"][stage]):
            ids, stopped, text, well_formed = _direct(export, prompt)
            assert answer == {"response": text, "tokens": len(ids), "stopped": stopped, "format_ok": well_formed,
                              "score": annotator.score(question, text, stopped)}, (stage, question)
    # Both paths are exercised: the fresh model runs to the limit, the trained one answers and stops.
    assert all(not a["stopped"] and a["tokens"] == MAX_NEW for a in result["answers"]["random"])
    assert [a["response"] for a in result["answers"]["answers"]] == ["4"] * len(PROMPTS)
    assert all(a["stopped"] and a["format_ok"] for a in result["answers"]["answers"])


def test_a_prompt_near_the_context_end_gets_a_shorter_answer_and_changes_no_other(exports):
    _, tokenizer = load_export(exports["random"])
    template = chat_template_for(tokenizer)
    long = next(p for k in range(1, 200) if len(template.generation_prompt(
        p := [{"role": "user", "content": "fox " * k}])) >= CFG.max_seq_len - MAX_NEW // 2)
    room = CFG.max_seq_len - len(template.generation_prompt(long))
    assert 0 < room < MAX_NEW
    alone = side_by_side({"random": exports["random"]}, PROMPTS, max_new_tokens=MAX_NEW)
    mixed = side_by_side({"random": exports["random"]}, [long, *PROMPTS], max_new_tokens=MAX_NEW)
    assert mixed["answers"]["random"][0]["tokens"] == room
    assert mixed["answers"]["random"][1:] == alone["answers"]["random"]


def test_rows_with_answers_are_scored_by_the_exact_answer(exports):
    metadata = [{"answer": "4"}, {"answer": 5}, {"answer": "4.0", "op": "+"}]
    result = side_by_side({"answers": exports["answers"]}, PROMPTS, metadata=metadata, max_new_tokens=MAX_NEW)
    assert result["score_name"] == "exact_answer" and result["stages"] == ["answers"]
    assert [a["score"] for a in result["answers"]["answers"]] == [1.0, 0.0, 1.0]
    texts = [a["response"] for a in result["answers"]["answers"]]
    assert [a["score"] for a in result["answers"]["answers"]] == exact_answer(result["prompts"], texts, metadata)


@pytest.mark.parametrize("kwargs,message", [
    ({"metadata": [{"answer": "4"}]}, "metadata has 1 rows for 3 prompts"),
    ({"metadata": [{"answer": "4"}, {"op": "+"}, {}]}, "metadata rows [1, 2] have no 'answer' field"),
    ({"prompts": [[{"role": "system", "content": "hi"}]]}, "prompt 0 has no user turn"),
    ({"prompts": [[{"role": "user", "content": "fox " * 200}]]}, "leaves no room to answer"),
    ({"prompts": []}, "at least one prompt"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_inputs_are_refused(exports, kwargs, message):
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(ValueError) as err:
        side_by_side(exports, **kwargs)
    assert message in str(err.value)
