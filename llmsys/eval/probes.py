"""Behaviour probes: what a stage changed in how the model answers, measured on held-out prompts.

The format/stop probe asks every checkpoint the same questions the same way: the user turns of SFT
validation conversations, rendered with the chat template's generation prompt
(``<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``), decoded greedily (or
sampled with a fixed seed) until the template's end-of-turn token (ChatML: ``<|im_end|>``; a
tokenizer's own template: its EOS) or ``max_new_tokens``. A pretrained-only model has the template
tokens in its vocabulary (llmsys's BPE reserves them) but never saw them in training, so it rambles
past the end of the turn; SFT teaches it to answer and stop. The rates come from
:func:`format_and_stop_rate`; the same answers are also scored by
:class:`llmsys.rlhf.RuleAnnotator` (``annotator_score``), the preference that the alignment stages
(DPO, PPO) should raise.

The exact-answer probe asks a verifiable task's held-out problems (``data=arith``: neither SFT nor an
online stage trains on them) and counts the greedy answers whose final number is the row's answer.

Prompts are chosen so no model has seen them in training: a validation conversation counts only when
its prompt also differs from the prompt of every training conversation (the chatterbot corpus repeats
some questions across files).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from llmsys.config.schema import DataConfig
from llmsys.data import (
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    Tokenizer,
    chat_template_for,
    data_cache_root,
    iter_conversations,
    load_sft_data,
    load_tokenizer,
    prepare_sft_data,
)
from llmsys.models import Transformer, load_state, read_config
from llmsys.models.generation import generate
from llmsys.rlhf.rewards import RuleAnnotator, exact_answer

Messages = list[dict[str, str]]


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """An llmsys export (``<output_dir>/final``) as an eval-mode model on ``device`` and its tokenizer."""
    cfg = read_config(path)
    model = Transformer(cfg)
    model.load_state_dict(load_state(path, cfg))
    return model.to(device).eval(), load_tokenizer(path)


def _prompt_turns(messages: Messages) -> Messages:
    """The turns before the first assistant reply: what the model is asked."""
    first = next(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:first]


def held_out_prompts(data_cfg: DataConfig, tokenizer: Tokenizer, n: int | None = None) -> list[Messages]:
    """Up to ``n`` (all when None) prompts of the SFT validation split that no training example contains.

    Each prompt is the list of turns before a validation conversation's first assistant reply, in corpus
    order, without duplicates. The split is read back from the SFT cache that ``stage=sft`` builds for
    ``data_cfg`` and ``tokenizer`` (built here if absent), so it is exactly the one the trainer held out.
    """
    cache = load_sft_data(prepare_sft_data(data_cfg, data_cache_root(data_cfg), tokenizer=tokenizer))
    template = chat_template_for(tokenizer, data_cfg.chat_template)

    def example_keys(split) -> set[tuple[int, ...]]:
        return {tuple(split.raw(i)[0].tolist()) for i in range(len(split))}

    val_keys, train_keys = example_keys(cache.val), example_keys(cache.train)
    val_prompts: list[tuple[tuple[str, str], ...]] = []
    train_prompts: set[tuple[tuple[str, str], ...]] = set()
    for _, messages in iter_conversations(data_cfg):
        # The cache holds each conversation as encoded and cut to seq_len (data.sft_overflow=truncate).
        key = tuple(template.encode(messages)[0][:data_cfg.seq_len])
        prompt = tuple((m["role"], m["content"]) for m in _prompt_turns(messages))
        if key in train_keys:
            train_prompts.add(prompt)
        elif key in val_keys:
            val_prompts.append(prompt)
    chosen: list[Messages] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for prompt in val_prompts:
        if prompt in train_prompts or prompt in seen:
            continue
        seen.add(prompt)
        chosen.append([{"role": role, "content": content} for role, content in prompt])
        if n is not None and len(chosen) == n:
            break
    if not chosen:
        raise ValueError(f"{data_cfg.path or data_cfg.dataset}: no validation prompt is absent from training")
    return chosen


@torch.no_grad()
def format_stop_probe(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Messages], *,
                      max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                      batch_size: int = 32, chat_template: str = "auto", samples: int = 0) -> dict:
    """Generate an assistant turn for each prompt; how often it is well-formed and stops at the end of turn.

    The end of turn is the template's (``chat_template``; ChatML: ``<|im_end|>``). Returns
    ``format_and_stop_rate``'s ``n``/``stopped``/``well_formed``/``both`` plus ``mean_length``
    (generated tokens per answer, the end-of-turn token included; ``max_new_tokens`` when it never
    stopped) and, when ``samples`` > 0, the first ``samples`` (question, answer) pairs as text.
    ``temperature`` 0 is greedy; otherwise sampling draws from a generator seeded with ``seed``.
    """
    template = chat_template_for(tokenizer, chat_template)
    end_of_turn = template.end_of_turn_id
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = [template.generation_prompt(p) for p in prompts[start:start + batch_size]]
        room = model.cfg.max_seq_len - max(len(p) for p in batch)
        if room < 1:
            raise ValueError(f"a prompt of {max(len(p) for p in batch)} tokens leaves no room to answer within "
                             f"the model's max_seq_len={model.cfg.max_seq_len}")
        out = generate(model, batch, min(max_new_tokens, room), temperature=temperature, top_p=top_p,
                       eos_id=end_of_turn, pad_id=tokenizer.pad_id, generator=generator)
        answers += [out.tokens[row, :int(out.lengths[row])].tolist() for row in range(len(batch))]
    result: dict = dict(format_and_stop_rate(answers, tokenizer, chat_template))
    result["mean_length"] = sum(len(a) for a in answers) / len(answers)
    # The rule-based stand-in for human rankers (the one that ranked data=prefs): what alignment should raise.
    finished = [bool(a) and a[-1] == end_of_turn for a in answers]
    texts = [tokenizer.decode(a[:-1] if done else a) for a, done in zip(answers, finished)]
    result["annotator_score"] = RuleAnnotator().mean_score([p[-1]["content"] for p in prompts], texts, finished)
    if samples:
        result["samples"] = [{"prompt": prompts[i][-1]["content"],
                              "answer": tokenizer.decode(answers[i], skip_special_tokens=False)}
                             for i in range(min(samples, len(answers)))]
    return result


def format_and_stop_rate(generations: Sequence[Sequence[int]], tokenizer: Tokenizer,
                         chat_template: str = "auto") -> dict[str, float]:
    """How often generated assistant turns stop properly and stay well-formed.

    ``generations`` are the token ids generated after the assistant header for held-out prompts.
    ``stopped``: the fraction that end with the end-of-turn token of the template ``chat_template``
    selects for ``tokenizer`` (ChatML: ``<|im_end|>``). ``well_formed``: the fraction with no template
    token (``<|im_start|>``, ``<|endoftext|>``, ``<|pad|>``, or an end of turn before the end) and some
    content before the stop. ``both``: stopped and well-formed.
    """
    n = len(generations)
    if n == 0:
        raise ValueError("format_and_stop_rate needs at least one generation")
    end_of_turn = chat_template_for(tokenizer, chat_template).end_of_turn_id
    stray = {tokenizer.token_to_id(token) for token in (IM_START_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_END_TOKEN)}
    stray.add(end_of_turn)
    stray.discard(None)
    stopped = well_formed = both = 0
    for generation in generations:
        ids = list(generation)
        ends = bool(ids) and ids[-1] == end_of_turn
        body = ids[:-1] if ends else ids
        clean = bool(body) and not any(token in stray for token in body)
        stopped += ends
        well_formed += clean
        both += ends and clean
    return {"n": n, "stopped": stopped / n, "well_formed": well_formed / n, "both": both / n}


def exact_answer_probe(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]],
                       metadata: Sequence[dict], texts: Sequence[str], *, max_new_tokens: int = 16,
                       batch_size: int = 64, chat_template: str = "auto", samples: int = 0) -> dict:
    """Greedy answers to held-out prompts of a verifiable task (``prompts`` are generation prompts as token
    ids, ``metadata`` their rows' fields with the ``answer``): the exact-answer rate (``accuracy``, the
    :func:`llmsys.rlhf.rewards.exact_answer` check), how often the answer stopped at the end of turn, and
    the mean answer length; with ``samples`` > 0 the first question/answer pairs as text."""
    end_of_turn = chat_template_for(tokenizer, chat_template).end_of_turn_id
    answers, finished = [], []
    for start in range(0, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start:start + batch_size]]
        out = generate(model, batch, max_new_tokens, temperature=0.0, eos_id=end_of_turn, pad_id=tokenizer.pad_id)
        for row in range(len(batch)):
            n, done = int(out.lengths[row]), bool(out.finished[row])
            answers.append(tokenizer.decode(out.tokens[row, :n - int(done)].tolist()))
            finished.append(done)
    correct = exact_answer(list(texts), answers, [dict(m) for m in metadata])
    result: dict = {"n": len(answers), "accuracy": sum(correct) / len(answers),
                    "stopped": sum(finished) / len(answers),
                    "mean_answer_chars": sum(len(a) for a in answers) / len(answers)}
    if samples:
        result["samples"] = [{"prompt": texts[i], "answer": answers[i], "expected": str(metadata[i]["answer"])}
                             for i in range(min(samples, len(answers)))]
    return result
