"""The Hugging Face export carries how the model chats: ``transformers`` must render llmsys's chat template to the
same ids and stop ``generate`` at the same end of turn as llmsys does (llmsys/models/hf.py, ``save_hf``)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmsys.data import EOS_TOKEN, IM_END_TOKEN, Tokenizer, chat_template_for, load_tokenizer
from llmsys.data.templates import ChatMLTemplate, HFChatTemplate
from llmsys.eval.probes import held_out_prompts, load_export
from llmsys.models import export_hf, save_pretrained
from llmsys.models.hf import chat_behaviour
from llmsys.pipeline import compose_config, for_stage
from tests.conftest import PIPELINE_OVERRIDES
from tests.tiny_chat import chat_tokenizer, greedy, tiny_chat_export, tiny_model
from tests.tools import missing_tool

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "5."}, {"role": "user", "content": " 日本語 café 🙂\nsecond line  "}],
    [{"role": "user", "content": "  leading spaces"}, {"role": "assistant", "content": "\n\nnewlines first"},
     {"role": "user", "content": ""}],
]
# A tokenizer's own template in the Zephyr style: turns closed by the tokenizer's EOS token.
OWN_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")


@pytest.fixture(scope="module")
def transformers():
    try:
        import transformers
    except ImportError:
        missing_tool("transformers is not installed (pip install -e .[dev])")
    return transformers


def _hf_ids(transformers, directory: Path, messages, add_generation_prompt: bool) -> list[int]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         return_dict=True)["input_ids"]


def _export(root: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    model = tiny_model(vocab_size)
    final = save_pretrained(model.state_dict(), model.cfg, root / "final", tokenizer_dir=tokenizer_dir)
    return export_hf(final, root / "hf")


def test_chatml_export_renders_llmsys_ids_and_names_the_end_of_turn(tmp_path, transformers):
    tokenizer = chat_tokenizer(tmp_path / "tok")
    template = chat_template_for(tokenizer, "auto")
    assert isinstance(template, ChatMLTemplate)  # the tokenizer has no template of its own
    out = _export(tmp_path, tmp_path / "tok", tokenizer.vocab_size)
    for messages in CONVERSATIONS:
        assert _hf_ids(transformers, out, messages, True) == template.generation_prompt(messages), messages
        assert _hf_ids(transformers, out, messages, False) == template.encode(messages)[0], messages

    im_end, eos = tokenizer.token_to_id(IM_END_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [im_end, eos]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == im_end
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == IM_END_TOKEN
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token_id == im_end
    # Read back by llmsys (chat, init_from): the exported Jinja template, the same ids and end of turn.
    again = chat_template_for(load_tokenizer(out), "auto")
    assert isinstance(again, HFChatTemplate) and again.end_of_turn_id == im_end
    assert all(again.generation_prompt(m) == template.generation_prompt(m) for m in CONVERSATIONS)


def test_own_template_export_keeps_it_and_stops_at_its_eos(tmp_path, transformers):
    chat_tokenizer(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": OWN_TEMPLATE}))
    # An imported HF model's generation config, whose EOS list lacks the end of turn.
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2], "pad_token_id": 1}))
    tokenizer = Tokenizer.from_dir(tmp_path / "tok")
    template = chat_template_for(tokenizer, "auto")
    assert isinstance(template, HFChatTemplate) and template.end_of_turn == EOS_TOKEN
    out = _export(tmp_path, tmp_path / "tok", tokenizer.vocab_size)
    for messages in CONVERSATIONS:
        assert _hf_ids(transformers, out, messages, True) == template.generation_prompt(messages), messages
    exported = json.loads((out / "tokenizer_config.json").read_text())
    assert exported["chat_template"] == OWN_TEMPLATE and exported["eos_token"] == EOS_TOKEN
    assert json.loads((out / "generation_config.json").read_text()) == {
        "eos_token_id": [tokenizer.eos_id, 2], "pad_token_id": 1}


def test_tokenizer_without_chat_markers_exports_unchanged(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({"<|endoftext|>": 0, "<|pad|>": 1, "a": 2, "b": 3}, unk_token="<|pad|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert chat_behaviour(tmp_path / "tok") is None
    out = _export(tmp_path, tmp_path / "tok", 4)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"eos_token": "<|endoftext|>"}
    assert json.loads((out / "generation_config.json").read_text()) == {"eos_token_id": 0}


@torch.no_grad()
def test_transformers_generate_stops_where_llmsys_does(tmp_path, transformers):
    prompt = [{"role": "user", "content": "Hello there"}]
    final = tiny_chat_export(tmp_path, prompt, stop_step=4)
    out = export_hf(final, tmp_path / "hf")
    _assert_same_stopping_answers(transformers, final, out, [prompt, [{"role": "user", "content": "Tell me more"}]],
                                  max_new_tokens=12, min_stopped=1)


def _assert_same_stopping_answers(transformers, final: Path, hf_dir: Path, prompts, max_new_tokens: int,
                                  min_stopped: int) -> None:
    """transformers' greedy ``generate`` on ``hf_dir`` gives llmsys's greedy answers on ``final``, token for token,
    and ends each answer llmsys ends (at least ``min_stopped``) with the end-of-turn id, before the limit."""
    model, tokenizer = load_export(final)
    end_of_turn = chat_template_for(tokenizer, "auto").end_of_turn_id
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    stopped = 0
    for messages in prompts:
        ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        ours = greedy(model, tokenizer, messages, max_new_tokens)
        expected = ours.tokens[0, :int(ours.lengths[0])].tolist()
        generated = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()
        assert generated == expected, messages
        if bool(ours.finished[0]):
            assert generated[-1] == end_of_turn and len(generated) < max_new_tokens
            stopped += 1
    assert stopped >= min_stopped, f"{stopped} of {len(prompts)} answers ended their turn"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_pipeline_exports_stop_at_the_end_of_their_turn_in_transformers(tmp_path, transformers, pipeline_run, stage):
    """The reported bug: the pipeline's export wrote no chat template and ``<|endoftext|>`` as EOS, so transformers
    never stopped. Exported with the command line, each trained chat model must answer as llmsys does and stop."""
    final = pipeline_run / stage / "final"
    proc = subprocess.run([sys.executable, "-m", "llmsys.models.hf", "export", str(final), str(tmp_path / "hf")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data_cfg = compose_config(["stage=sft", "data=chat", *for_stage("sft", PIPELINE_OVERRIDES)]).data
    prompts = held_out_prompts(data_cfg, load_tokenizer(final), 8)
    # Measured on this pipeline (report.json): SFT ends 87% of the held-out answers within 48 tokens, DPO and PPO 97%.
    _assert_same_stopping_answers(transformers, final, tmp_path / "hf", prompts, max_new_tokens=48, min_stopped=4)
