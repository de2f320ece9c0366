"""SFT data: template labels, row forms, packing equivalence on a real model, overflow, cache, bad input."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch
import torch.nn.functional as F

from llmsys.config import ModelConfig
from llmsys.config.schema import DataConfig
from llmsys.data import (
    IGNORE_INDEX,
    BlockSampler,
    DataError,
    chat_template_for,
    collate_packed,
    collate_padded,
    embedded_corpus_path,
    iter_conversations,
    load_sft_data,
    load_tokenizer,
    pack_examples,
    prepare_sft_data,
)
from llmsys.data.templates import ChatMLTemplate, HFChatTemplate
from llmsys.data.tokenizer import Tokenizer
from llmsys.eval import format_and_stop_rate
from llmsys.models import Transformer

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there <|im_end|> sneaky"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine, thanks!"},
]


def _conversations(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["fox", "dog", "hello", "today", "numbers", "quick", "lazy", "fine"]
    rows = []
    for i in range(n):
        answer = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        question = " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
        rows.append({"prompt": f"{i}: {question}?", "response": answer})
    return rows


def _cfg(path: Path, tmp_path: Path, tokenizer, **kw) -> DataConfig:
    tok_dir = tokenizer.save(tmp_path / "tok")
    kw.setdefault("seq_len", 64)
    kw.setdefault("val_fraction", 0.2)
    return DataConfig(path=str(path), tokenizer=str(tok_dir), cache_dir=str(tmp_path / "cache"), **kw)


# -- labels --------------------------------------------------------------------------------------


def test_multi_turn_labels_cover_exactly_assistant_content_and_end_of_turn(tokenizer):
    template = ChatMLTemplate(tokenizer)
    ids, targets = template.encode(MULTI_TURN)
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    # User text "<|im_end|>" stays plain text: exactly one im_end per turn, one im_start per turn.
    assert ids.count(im_end) == len(MULTI_TURN) and ids.count(im_start) == len(MULTI_TURN)
    trained = [t for t, m in zip(ids, targets) if m]
    assert tokenizer.decode(trained) == "Hello.<|im_end|>Fine, thanks!<|im_end|>"
    # Walk the turns: headers, system and user tokens are never targets.
    position = 0
    for message in MULTI_TURN:
        header = [im_start] + tokenizer.encode(f"{message['role']}\n")
        content = tokenizer.encode(message["content"])
        assert ids[position:position + len(header)] == header
        assert not any(targets[position:position + len(header)])
        position += len(header)
        span = targets[position:position + len(content) + 1]  # content + <|im_end|>
        assert all(span) if message["role"] == "assistant" else not any(span)
        position += len(content) + 1
        assert not targets[position]  # the newline after <|im_end|>
        position += 1
    assert position == len(ids)


def test_shifted_labels_decode_to_the_assistant_turns(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MULTI_TURN}] * 4)
    data = load_sft_data(prepare_sft_data(_cfg(path, tmp_path, tokenizer, seq_len=256), tmp_path / "cache"))
    assert data.manifest["counts"]["truncated"] == 0
    ids, labels = data.train[0]
    assert labels[-1] == IGNORE_INDEX
    assert torch.equal(labels[:-1][labels[:-1] != IGNORE_INDEX], ids[1:][labels[:-1] != IGNORE_INDEX])
    assert tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == "Hello.<|im_end|>Fine, thanks!<|im_end|>"


def test_prompt_response_equals_messages_form(tmp_path, tokenizer, write_jsonl):
    a = write_jsonl(tmp_path / "a" / "x.jsonl",
                    [{"system": "Be kind.", "prompt": "Hi?", "response": "Hello!"}, {"prompt": "Q", "response": "A"}])
    b = write_jsonl(tmp_path / "b" / "x.jsonl", [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    template = ChatMLTemplate(tokenizer)
    cfg_a, cfg_b = _cfg(a, tmp_path, tokenizer), _cfg(b, tmp_path, tokenizer)
    encoded_a = [template.encode(m) for _, m in iter_conversations(cfg_a)]
    encoded_b = [template.encode(m) for _, m in iter_conversations(cfg_b)]
    assert encoded_a == encoded_b and len(encoded_a) == 2


def test_parquet_rows_are_read(tmp_path, tokenizer):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"prompt": ["Hi?", "Yo"], "response": ["Hello!", "Hey"]}), path)
    conversations = list(iter_conversations(_cfg(path, tmp_path, tokenizer)))
    assert [m[-1]["content"] for _, m in conversations] == ["Hello!", "Hey"]


# -- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [17, 64, 203])
def test_pack_examples_fills_rows_with_every_example_once(seq_len):
    lengths = np.random.default_rng(seq_len).integers(1, seq_len + 1, size=113)
    rows = pack_examples(lengths, seq_len)
    assert sorted(i for row in rows for i in row) == list(range(113))
    assert all(sum(lengths[i] for i in row) <= seq_len for row in rows)
    assert len(rows) >= -(-int(lengths.sum()) // seq_len)
    assert rows == pack_examples(lengths, seq_len)  # deterministic
    with pytest.raises(ValueError, match="seq_len"):
        pack_examples([seq_len + 1], seq_len)


CHAT_SEQ_LEN = 203


@pytest.fixture
def chat_data(tmp_path, tokenizer, write_jsonl):
    path = write_jsonl(tmp_path / "chat.jsonl", _conversations(40))
    return load_sft_data(prepare_sft_data(_cfg(path, tmp_path, tokenizer, seq_len=CHAT_SEQ_LEN), tmp_path / "cache"))


def test_packed_rows_keep_examples_apart(chat_data):
    packed = chat_data.packed()
    seen = []
    for row in range(len(packed)):
        batch = packed.collate([row])
        ids, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"]
        assert ids.shape == labels.shape and ids.shape[1] <= CHAT_SEQ_LEN and cu.dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == ids.shape[1] and bool((cu[1:] > cu[:-1]).all())
        assert bool((labels[0, cu[1:].long() - 1] == IGNORE_INDEX).all())  # no label crosses a boundary
        for k, example in enumerate(packed.rows[row]):
            example_ids, example_labels = chat_data.train[example]
            assert torch.equal(ids[0, cu[k]:cu[k + 1]], example_ids)
            assert torch.equal(labels[0, cu[k]:cu[k + 1]], example_labels)
        seen += packed.rows[row]
    assert sorted(seen) == list(range(len(chat_data.train)))
    # Several rows collate into one longer packed sequence for one forward pass.
    both = packed.collate([0, 1])
    assert both["input_ids"].shape[1] == sum(packed.collate([r])["input_ids"].shape[1] for r in (0, 1))


def test_sampler_over_packed_rows_is_the_block_sampler(chat_data):
    packed = chat_data.packed()
    sampler = BlockSampler(len(packed), seed=3)
    micro = sampler.micro_batches(step=0, global_batch=4, micro_batch=1, rank=1, world_size=2)
    assert len(micro) == 2 and all(0 <= r < len(packed) for mb in micro for r in mb)
    assert packed.collate(micro[0])["input_ids"].shape[0] == 1


def _per_example_loss_sums(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").reshape(labels.shape)


def test_packed_and_padded_batches_give_the_same_per_example_losses(chat_data):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                    vocab_size=320, max_seq_len=256)).eval()
    packed = chat_data.packed()
    row = max(range(len(packed)), key=lambda r: len(packed.rows[r]))
    examples = packed.rows[row]
    assert len(examples) >= 3
    assert chat_data.manifest["counts"]["truncated"] == 0
    batch = packed.collate([row])
    padded = collate_padded(chat_data.train, examples, pad_id=chat_data.tokenizer.pad_id)
    with torch.no_grad():
        packed_losses = _per_example_loss_sums(model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"]),
                                               batch["labels"])[0]
        padded_losses = _per_example_loss_sums(model(padded["input_ids"]), padded["labels"])
        packed_logits = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"])
    cu = batch["cu_seqlens"].tolist()
    for k in range(len(examples)):
        assert torch.allclose(packed_losses[cu[k]:cu[k + 1]].sum(), padded_losses[k].sum(), rtol=1e-5, atol=1e-5)
    # The model's own mean loss agrees too.
    with torch.no_grad():
        mean = model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"])
    assert torch.allclose(mean.double(), packed_losses.sum() / (batch["labels"] != IGNORE_INDEX).sum(), rtol=1e-5)
    # Perturbing the first example changes no logit of the others.
    perturbed = batch["input_ids"].clone()
    perturbed[0, cu[0]:cu[1]] = torch.randint(0, 300, (cu[1] - cu[0],))
    with torch.no_grad():
        other = model(perturbed, cu_seqlens=batch["cu_seqlens"])
    assert not torch.allclose(other[0, :cu[1]], packed_logits[0, :cu[1]])
    assert torch.equal(other[0, cu[1]:], packed_logits[0, cu[1]:])


def test_collate_padded_masks_padding(chat_data):
    batch = collate_padded(chat_data.train, [0, 1, 2], pad_id=chat_data.tokenizer.pad_id)
    for row in range(3):
        length = len(chat_data.train[row][0])
        assert bool((batch["labels"][row, length:] == IGNORE_INDEX).all())
        assert bool((batch["input_ids"][row, length:] == chat_data.tokenizer.pad_id).all())
    assert collate_packed(chat_data.train, [0, 1])["cu_seqlens"].tolist()[0] == 0


# -- overflow, cache -----------------------------------------------------------------------------


def test_overflow_policy_counts(tmp_path, tokenizer, write_jsonl, caplog):
    rows = [{"prompt": "hi", "response": "fox"}, {"prompt": "hi", "response": "fox " * 60},
            {"prompt": "dog " * 80, "response": "fox"}, {"prompt": "hello", "response": "lazy dog"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="llmsys.data.sft"):
        truncate = load_sft_data(prepare_sft_data(_cfg(path, tmp_path, tokenizer, seq_len=32, val_fraction=0.25),
                                                  tmp_path / "cache"))
    assert truncate.manifest["counts"] == {"conversations": 4, "kept": 3, "truncated": 1, "dropped": 1}
    assert "kept 3 (truncated 1), dropped 1" in caplog.text
    assert max(truncate.train.lengths.max(), truncate.val.lengths.max()) <= 32
    drop = load_sft_data(prepare_sft_data(_cfg(path, tmp_path, tokenizer, seq_len=32, val_fraction=0.25,
                                               sft_overflow="drop"), tmp_path / "cache"))
    assert drop.manifest["counts"] == {"conversations": 4, "kept": 2, "truncated": 0, "dropped": 2}
    with pytest.raises(ValueError, match="sft_overflow"):
        DataConfig(path="x", sft_overflow="wrap")


def test_cache_is_reused_and_invalidated(tmp_path, tokenizer, write_jsonl, caplog):
    path = write_jsonl(tmp_path / "c.jsonl", _conversations(10))
    cfg = _cfg(path, tmp_path, tokenizer)
    first = prepare_sft_data(cfg, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="llmsys.data.sft"):
        assert prepare_sft_data(cfg, tmp_path / "cache") == first
    assert "Reusing SFT data" in caplog.text
    assert prepare_sft_data(_cfg(path, tmp_path, tokenizer, seq_len=65), tmp_path / "cache") != first
    write_jsonl(path, _conversations(11))
    second = prepare_sft_data(cfg, tmp_path / "cache")
    assert second != first and len(load_sft_data(second).train) + len(load_sft_data(second).val) == 11
    (second / "train_tokens.bin").write_bytes(b"\0")  # truncated: not a valid cache any more
    with pytest.raises(DataError, match="not a complete SFT cache"):
        load_sft_data(second)
    assert prepare_sft_data(cfg, tmp_path / "cache") == second  # rebuilt in place
    load_sft_data(second)


def test_sft_needs_the_models_tokenizer(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "c.jsonl", _conversations(3))
    with pytest.raises(DataError, match="data.tokenizer"):
        prepare_sft_data(DataConfig(path=str(path)), tmp_path / "cache")


# -- a split declared by the rows ----------------------------------------------------------------


def test_rows_that_declare_their_split_keep_it(tmp_path, tokenizer, write_jsonl):
    rows = [{**row, "split": "val" if i % 3 == 0 else "train"} for i, row in enumerate(_conversations(12))]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    data = load_sft_data(prepare_sft_data(_cfg(path, tmp_path, tokenizer, seq_len=128), tmp_path / "cache"))
    template = ChatMLTemplate(tokenizer)

    def encoded(split: str) -> set[tuple[int, ...]]:
        return {tuple(template.encode([{"role": "user", "content": row["prompt"]},
                                       {"role": "assistant", "content": row["response"]}])[0])
                for row in rows if row["split"] == split}

    for split in ("train", "val"):
        cached = getattr(data, split)
        assert {tuple(cached.raw(i)[0].tolist()) for i in range(len(cached))} == encoded(split)
    assert len(data.val) == 4  # the rows' split, not data.val_fraction=0.2 of 12


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "response": "b", "split": "train"}, {"prompt": "c", "response": "d"}],
     r"c.jsonl:2: no 'split' field, but .*c.jsonl:1 has one; either every row declares its split"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d", "split": "val"}],
     r"c.jsonl:2: a 'split' field, but .*c.jsonl:1 has none"),
    ([{"prompt": "a", "response": "b", "split": "test"}, {"prompt": "c", "response": "d", "split": "val"}],
     r"c.jsonl:1: field 'split' is 'test'; expected one of 'train', 'val'"),
    ([{"prompt": "a", "response": "b", "split": "train"}, {"prompt": "c", "response": "d", "split": "train"}],
     r"the rows' 'split' fields put 0 of 2 usable conversations in val"),
])
def test_declared_splits_fail_clearly(tmp_path, tokenizer, write_jsonl, rows, message):
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=message):
        prepare_sft_data(_cfg(path, tmp_path, tokenizer), tmp_path / "cache")


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("row, message", [
    ({"question": "a", "answer": "b"}, "fields present: 'question', 'answer'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    ({"prompt": "a", "response": "  "}, "empty assistant response"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}, "content is a number"),
])
def test_bad_rows_name_file_and_line(tmp_path, tokenizer, write_jsonl, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, "", row])
    with pytest.raises(DataError, match=f"bad.jsonl:3: .*{message}"):
        prepare_sft_data(_cfg(path, tmp_path, tokenizer), tmp_path / "cache")


def test_non_utf8_byte_names_file_line_and_offset(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    first = b'{"prompt": "ok", "response": "fine"}\n'
    path.write_bytes(first + b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=f"bad.jsonl:2: invalid UTF-8 at byte offset {len(first) + 15}"):
        prepare_sft_data(_cfg(path, tmp_path, tokenizer), tmp_path / "cache")


# -- embedded default, measurement ---------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                    reason="pip install --no-deps chatterbot-corpus")
def test_embedded_chatterbot_corpus_loads(tmp_path):
    cfg = DataConfig(path=str(embedded_corpus_path("chatterbot")))
    conversations = list(iter_conversations(cfg))
    assert len(conversations) == 2025  # 2026 shipped, one malformed entry in trivia.yml skipped
    assert all(m[0]["role"] == "user" and m[-1]["role"] == "assistant" for _, m in conversations)
    assert sum(len(m) // 2 for _, m in conversations) == 2144


def test_format_and_stop_rate(tokenizer):
    im_end, im_start = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|im_start|>")
    word = tokenizer.encode("fox")
    rates = format_and_stop_rate([word + [im_end], word, word + [im_start] + word + [im_end], [im_end]],
                                 tokenizer)
    assert rates == {"n": 4, "stopped": 0.75, "well_formed": 0.5, "both": 0.25}


# -- a tokenizer's own Jinja chat template ---------------------------------------------------------

# Zephyr's template (HuggingFaceH4/zephyr-7b-beta), turns closed by the tokenizer's eos_token. Rendered
# with trim_blocks, so each turn is "<|role|>\n{content}{eos}\n" and the generation prompt "<|assistant|>\n".
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n' + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
CHATML_JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ZEPHYR_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# The HF path parses special tokens in the rendered text, so no marker may appear inside contents here.
PLAIN_MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, quick fox?"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine, thanks!"},
]

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the Jinja template path renders through transformers")


def _with_chat_template(tokenizer, directory: Path, template: str, extra_tokens=()) -> Path:
    """Save ``tokenizer`` (plus ``extra_tokens`` as special tokens) with ``template`` in tokenizer_config.json."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    backend.add_special_tokens(list(extra_tokens))
    Tokenizer(backend, eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
              extra_config={"chat_template": template}).save(directory)
    return directory


@needs_transformers
def test_jinja_template_labels_cover_exactly_assistant_content_and_end_token(tmp_path, tokenizer):
    zephyr = load_tokenizer(_with_chat_template(tokenizer, tmp_path / "zephyr", ZEPHYR_TEMPLATE, ZEPHYR_TOKENS))
    assert zephyr.hf_config()["chat_template"] == ZEPHYR_TEMPLATE
    template = chat_template_for(zephyr, "auto")
    assert isinstance(template, HFChatTemplate)
    eos, newline = zephyr.eos_id, zephyr.encode("\n")
    role_ids = {role: zephyr.token_to_id(f"<|{role}|>") for role in ("system", "user", "assistant")}
    assert None not in role_ids.values() and len(set(role_ids.values())) == 3

    ids, targets = template.encode(PLAIN_MULTI_TURN)
    assert len(ids) == len(targets)
    # Walk the turns: "<|role|>" "\n" content eos "\n"; only assistant content + its eos are targets.
    position = 0
    for message in PLAIN_MULTI_TURN:
        header = [role_ids[message["role"]]] + newline
        content = zephyr.encode(message["content"])
        assert ids[position:position + len(header)] == header
        assert not any(targets[position:position + len(header)])
        position += len(header)
        assert ids[position:position + len(content) + 1] == content + [eos]
        span = targets[position:position + len(content) + 1]
        assert all(span) if message["role"] == "assistant" else not any(span)
        position += len(content) + 1
        assert ids[position:position + len(newline)] == newline and not any(targets[position:position + len(newline)])
        position += len(newline)
    assert position == len(ids)
    trained = [t for t, m in zip(ids, targets) if m]
    assert zephyr.decode(trained) == "Hello.<|endoftext|>Fine, thanks!<|endoftext|>"

    prompt = template.generation_prompt(PLAIN_MULTI_TURN[:-1])
    assert prompt[-1 - len(newline):] == [role_ids["assistant"]] + newline
    assert prompt == ids[:len(prompt)]  # the prompt is the prefix the model continues from
    assert ids[len(prompt):len(prompt) + len(zephyr.encode("Fine, thanks!")) + 1] == \
        zephyr.encode("Fine, thanks!") + [eos]



@needs_transformers
def test_jinja_template_through_prepare_sft_data(tmp_path, tokenizer, write_jsonl):
    tok_dir = _with_chat_template(tokenizer, tmp_path / "zephyr", ZEPHYR_TEMPLATE, ZEPHYR_TOKENS)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": PLAIN_MULTI_TURN}] * 4)
    cfg = DataConfig(path=str(path), tokenizer=str(tok_dir), cache_dir=str(tmp_path / "cache"), seq_len=256,
                     val_fraction=0.25)
    data = load_sft_data(prepare_sft_data(cfg, tmp_path / "cache"))
    assert data.manifest["template"] == "hf" and data.manifest["counts"]["truncated"] == 0
    ids, labels = data.train[0]
    kept = labels[:-1] != IGNORE_INDEX
    assert torch.equal(labels[:-1][kept], ids[1:][kept])
    assert data.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == \
        "Hello.<|endoftext|>Fine, thanks!<|endoftext|>"
    # data.chat_template=chatml forces the built-in template even though the tokenizer carries its own.
    cfg_chatml = DataConfig(path=str(path), tokenizer=str(tok_dir), cache_dir=str(tmp_path / "cache"),
                            seq_len=256, val_fraction=0.25, chat_template="chatml")
    chatml = load_sft_data(prepare_sft_data(cfg_chatml, tmp_path / "cache"))
    assert chatml.manifest["template"] == "chatml"
    ids, labels = chatml.train[0]
    assert chatml.tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == \
        "Hello.<|im_end|>Fine, thanks!<|im_end|>"


@needs_transformers
def test_chatml_written_as_jinja_equals_the_built_in_template(tmp_path, tokenizer):
    loaded = load_tokenizer(_with_chat_template(tokenizer, tmp_path / "chatml", CHATML_JINJA_TEMPLATE))
    jinja = chat_template_for(loaded, "auto")
    built_in = chat_template_for(loaded, "chatml")
    assert isinstance(jinja, HFChatTemplate) and isinstance(built_in, ChatMLTemplate)
    conversations = [PLAIN_MULTI_TURN, PLAIN_MULTI_TURN[1:3], PLAIN_MULTI_TURN[1:],
                     PLAIN_MULTI_TURN + [{"role": "user", "content": "Bye."}]]  # ends on a user turn
    for messages in conversations:
        ids, targets = jinja.encode(messages)
        assert (ids, targets) == built_in.encode(messages)
        assert any(targets)
        assert jinja.generation_prompt(messages) == built_in.generation_prompt(messages)


@needs_transformers
def test_jinja_template_in_its_own_file_is_found(tmp_path, tokenizer):
    # What transformers' save_pretrained writes nowadays: the template in chat_template.jinja.
    directory = _with_chat_template(tokenizer, tmp_path / "chatml", CHATML_JINJA_TEMPLATE)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    (directory / "chat_template.jinja").write_text(config.pop("chat_template"))
    config_file.write_text(json.dumps(config))
    template = chat_template_for(load_tokenizer(directory), "auto")
    assert isinstance(template, HFChatTemplate) and template.template == CHATML_JINJA_TEMPLATE
