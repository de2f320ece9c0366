"""Preference data for the reward model, DPO and PPO: ranked answers -> (prompt, chosen, rejected) tokens.

**Input.** ``data.path`` (a .jsonl/.parquet file or a folder of them) or ``data.dataset``. A row is,
detected per row, either a pair ``{"prompt", "chosen", "rejected"}`` or a K-wise ranking
``{"prompt", "responses": [r_0, ..., r_{K-1}], "ranking": [best, ..., worst]}`` where ``ranking``
lists indices of ``responses``, best first, and must be a permutation of ``range(K)`` (K >= 2).
A ranking is expanded into all ``K(K-1)/2`` ordered pairs, as InstructGPT trained its reward model
(Ouyang et al. 2022, sec. 3.5): ``(ranking[a], ranking[b])`` for ``a < b``, in that order. The
prompt is a text (one user turn, with an optional ``"system"`` text) or a list of chat messages
``{"role", "content"}`` that ends with a user turn. Other fields (``"annotator"``, ``"source"``)
are ignored. Bad rows fail with :class:`DataError` naming ``file:line`` (or the dataset row):
a missing field, a non-string text, an empty response, a pair whose chosen equals rejected
(after stripping), two equal responses in a ranking, a ranking that is not a permutation, a bad role.

**Tokens.** With the chat template of SFT (``data.chat_template``): the prompt is
``template.generation_prompt(prompt_messages)`` (the turns, then the assistant header) and a
response is what the template appends for the assistant turn that the SFT loss trains: its
content and the end-of-turn token (ChatML: ``content <|im_end|>``). So ``prompt + response`` is
exactly the start of the SFT encoding of the finished conversation.

**Overflow** (``data.sft_overflow``; ``L`` = the longer of chosen and rejected, ``S = data.seq_len``):
a pair fits when ``len(prompt) + L <= S``. Otherwise ``drop`` removes it; ``truncate`` keeps the
prompt's LAST ``max(S - L, S // 2)`` tokens (the question nearest the answer matters most) and then
each response's FIRST ``S - len(prompt)`` tokens (a cut response loses its end-of-turn token). A pair
whose two responses become identical is dropped. Counts (rows, prompts, pairs, kept, truncated,
dropped) go to the manifest.

**Split and cache.** Pairs are grouped by prompt, and prompts (in order of first appearance) are split
train/val by a fixed seeded permutation, so no prompt is in both splits and a preference file and
the PPO prompt set read from it (:func:`load_prompts`) split alike. Tokenized once into
``<cache>/preference/<key>/``: per split ``{split}_tokens.bin`` + ``{split}_offsets.npy`` (every
distinct token sequence once), ``{split}_pairs.npy`` (int64 ``(N, 3)``: sequence indices of prompt,
chosen, rejected), ``{split}_prompts.npy`` and ``{split}_prompt_texts.json`` (each prompt once, for
PPO and the annotator), plus ``tokenizer/`` and ``manifest.json`` written last.

**Embedded default** (``data=prefs``, ``${llmsys.corpus:prefs}``): see :func:`embedded_prefs_path`.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmsys.config import llmsys_home
from llmsys.config.schema import DataConfig
from llmsys.data.cache import build_once, stable_hash
from llmsys.data.embedded import (
    CHATTERBOT_EXTENSIONS,
    embedded_corpus_path,
    read_chatterbot_yaml,
)
from llmsys.data.pretrain import token_dtype
from llmsys.data.sft import (
    IGNORE_INDEX,
    SPLITS,
    Messages,
    SplitSequences,
    chat_template_for,
    check_message,
    finish_chat_cache,
    iter_source_rows,
    message_fields,
    open_chat_cache,
    prepare_chat_cache,
    read_chat_manifest,
    resolve_tokenizer,
    row_to_messages,
    write_sequences,
)
from llmsys.data.sources import DataError, LocalFiles, json_type, list_files
from llmsys.data.tokenizer import Tokenizer
from llmsys.eval.annotator import ANNOTATOR_NAME, RuleAnnotator

logger = logging.getLogger(__name__)

PREFERENCE_EXTENSIONS = (".jsonl", ".parquet")
PROMPT_EXTENSIONS = PREFERENCE_EXTENSIONS + CHATTERBOT_EXTENSIONS

FORMAT_VERSION = 1
_VAL_SPLIT_SEED = 0x9F3  # fixed: the split must not move when the training seed changes

_EXPECTED_ROW = ("{'prompt', 'chosen', 'rejected'} or {'prompt', 'responses', 'ranking'}")
_NEEDS_TOKENIZER = "preference data needs the tokenizer of the model it aligns"


# -- reading rows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for ``prompt_messages``, ``chosen`` is better than ``rejected``."""

    prompt_messages: Messages
    chosen: str
    rejected: str


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field} is a {json_type(value)}, expected a string")
    if not value.strip():
        raise DataError(f"{where}: field {field} is empty, expected text")
    return value


def _missing(row: dict, where: str, field: str) -> DataError:
    present = ", ".join(repr(key) for key in row) or "none"
    return DataError(f"{where}: missing field {field!r}; fields present: {present}; expected {_EXPECTED_ROW}")


def prompt_messages(row: dict, where: str) -> Messages:
    """The prompt of a preference (or prompt-only) row as chat messages ending with a user turn."""
    if row.get("prompt") is None:
        raise _missing(row, where, "prompt")
    prompt = row["prompt"]
    system = row.get("system")
    if isinstance(prompt, str):
        messages = [] if system is None else [{"role": "system", "content": _text(system, where, "'system'")}]
        return messages + [{"role": "user", "content": _text(prompt, where, "'prompt'")}]
    if not isinstance(prompt, (list, tuple)):
        raise DataError(f"{where}: field 'prompt' is a {json_type(prompt)}, expected a string or a list of "
                        f"{{'role', 'content'}} messages")
    if system is not None:
        raise DataError(f"{where}: field 'system' is only allowed with a text prompt; put the system "
                        f"message into the 'prompt' list instead")
    messages = []
    for index, message in enumerate(prompt):
        role, content = message_fields(message, where, f"prompt[{index}]")
        check_message(where, f"prompt[{index}]", role, content)
        messages.append({"role": role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        last = messages[-1]["role"] if messages else "nothing"
        raise DataError(f"{where}: the prompt ends with {last}; expected its last message to be a user turn")
    return messages


def row_to_pairs(row: Any, where: str) -> list[PreferencePair]:
    """Validate one row (pair or K-wise ranking form) and return its ordered preference pairs."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: got a {json_type(row)}, expected an object {_EXPECTED_ROW}")
    is_pair = "chosen" in row or "rejected" in row
    is_ranking = "responses" in row or "ranking" in row
    if is_pair == is_ranking:
        present = ", ".join(repr(key) for key in row) or "none"
        what = "both pair and ranking fields" if is_pair else "neither 'chosen'/'rejected' nor 'responses'/'ranking'"
        raise DataError(f"{where}: {what}; fields present: {present}; expected {_EXPECTED_ROW}")
    messages = prompt_messages(row, where)
    if is_pair:
        for field in ("chosen", "rejected"):
            if row.get(field) is None:
                raise _missing(row, where, field)
        chosen, rejected = _text(row["chosen"], where, "'chosen'"), _text(row["rejected"], where, "'rejected'")
        if chosen.strip() == rejected.strip():
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same text, so there is no preference")
        return [PreferencePair(messages, chosen, rejected)]
    for field in ("responses", "ranking"):
        if row.get(field) is None:
            raise _missing(row, where, field)
    responses, ranking = row["responses"], row["ranking"]
    if not isinstance(responses, (list, tuple)) or len(responses) < 2:
        got = f"{len(responses)} entries" if isinstance(responses, (list, tuple)) else f"a {json_type(responses)}"
        raise DataError(f"{where}: field 'responses' is {got}, expected a list of at least 2 texts")
    texts = [_text(response, where, f"responses[{i}]") for i, response in enumerate(responses)]
    seen: dict[str, int] = {}
    for index, text in enumerate(texts):
        first = seen.setdefault(text.strip(), index)
        if first != index:
            raise DataError(f"{where}: responses[{first}] and responses[{index}] are the same text; "
                            f"a ranking needs distinct responses")
    k = len(texts)
    if (not isinstance(ranking, (list, tuple)) or len(ranking) != k
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
            or sorted(ranking) != list(range(k))):
        raise DataError(f"{where}: field 'ranking' is {ranking!r}, expected a permutation of 0..{k - 1} "
                        f"(indices of 'responses', best first)")
    return [PreferencePair(messages, texts[ranking[a]], texts[ranking[b]])
            for a in range(k) for b in range(a + 1, k)]


def iter_preference_rows(cfg: DataConfig) -> Iterator[tuple[str, list[PreferencePair]]]:
    """``(where, pairs)`` for every row of ``data.path`` / ``data.dataset``, in a fixed order."""
    for where, row in iter_source_rows(cfg, PREFERENCE_EXTENSIONS, _EXPECTED_ROW):
        yield where, row_to_pairs(row, where)


def iter_prompts(cfg: DataConfig) -> Iterator[tuple[str, Messages]]:
    """``(where, prompt messages)`` of every row, from preference data or SFT chat data.

    A preference row (or a row with only ``"prompt"``) gives its prompt; an SFT row (prompt/response
    or messages, or a chatterbot YAML conversation) gives its messages up to its last user turn.
    """
    for where, row in iter_source_rows(cfg, PROMPT_EXTENSIONS, f"{_EXPECTED_ROW} or SFT 'messages'/'prompt'"):
        if isinstance(row, list):  # a chatterbot conversation: validated as a messages row
            row = {"messages": row}
        if isinstance(row, dict) and ("chosen" in row or "responses" in row
                                      or ("prompt" in row and row.get("response") is None)):
            yield where, prompt_messages(row, where)
            continue
        messages = row_to_messages(row, where)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise DataError(f"{where}: conversation has no user turn, so there is no prompt")
        yield where, messages[:last_user + 1]


def _prompt_key(messages: Messages) -> str:
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def _prompt_text(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _val_prompts(num_prompts: int, val_fraction: float, source: str) -> set[int]:
    """Indices (in order of first appearance) of the prompts held out for validation."""
    if num_prompts < 2:
        raise DataError(f"{source}: {num_prompts} distinct prompts; expected at least 2 (one for validation)")
    num_val = min(num_prompts - 1, max(1, round(num_prompts * val_fraction)))
    order = np.random.default_rng(_VAL_SPLIT_SEED).permutation(num_prompts)
    return set(order[:num_val].tolist())


# -- tokenizing ------------------------------------------------------------------------------------


def response_ids(template: Any, messages: Messages, prompt_ids: Sequence[int], response: str) -> list[int]:
    """The tokens the template appends after ``prompt_ids`` for the assistant turn ``response``.

    Taken from the SFT encoding of ``messages + [assistant]``: the trained span (content and
    end-of-turn), which must start right after the generation prompt.
    """
    ids, targets = template.encode(list(messages) + [{"role": "assistant", "content": response}])
    trained = [i for i, flag in enumerate(targets) if flag]
    if not trained or ids[:trained[0]] != list(prompt_ids):
        raise DataError(f"the {template.name} chat template does not put the assistant turn right after "
                        f"its generation prompt, so responses cannot be tokenized apart; set "
                        f"data.chat_template=chatml")
    return ids[trained[0]:trained[-1] + 1]


def fit_pair(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], seq_len: int,
             overflow: str) -> tuple[list[int], list[int], list[int]] | None:
    """Apply the overflow policy of the module docstring; None when the pair is dropped."""
    prompt, chosen, rejected = list(prompt), list(chosen), list(rejected)
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= seq_len:
        return prompt, chosen, rejected
    if overflow == "drop":
        return None
    keep = min(len(prompt), max(seq_len - longest, seq_len // 2))
    prompt = prompt[len(prompt) - keep:]
    room = seq_len - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    return None if chosen == rejected else (prompt, chosen, rejected)


def _tail(ids: Sequence[int], max_len: int) -> list[int]:
    return list(ids)[max(0, len(ids) - max_len):]


# -- building the cache ----------------------------------------------------------------------------


def _read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    return read_chat_manifest(cache_dir, FORMAT_VERSION,
                              files=("offsets.npy", "pairs.npy", "prompts.npy", "prompt_texts.json"))


class _SequenceStore:
    """Each distinct token sequence once; returns its index."""

    def __init__(self) -> None:
        self.index: dict[tuple[int, ...], int] = {}
        self.sequences: list[list[int]] = []

    def add(self, ids: Sequence[int]) -> int:
        key = tuple(ids)
        if key not in self.index:
            self.index[key] = len(self.sequences)
            self.sequences.append(list(ids))
        return self.index[key]


def _build(directory: Path, cfg: DataConfig, tokenizer: Tokenizer, template: Any, key: str,
           fingerprint: str) -> dict[str, Any]:
    groups: dict[str, tuple[Messages, list[PreferencePair]]] = {}
    counts = {"rows": 0, "prompts": 0, "pairs": 0, "kept": 0, "truncated": 0, "dropped": 0}
    for _, pairs in iter_preference_rows(cfg):
        counts["rows"] += 1
        counts["pairs"] += len(pairs)
        groups.setdefault(_prompt_key(pairs[0].prompt_messages), (pairs[0].prompt_messages, []))[1].extend(pairs)
    counts["prompts"] = len(groups)
    source = str(cfg.path or cfg.dataset)
    val = _val_prompts(len(groups), cfg.val_fraction, source)
    dtype = token_dtype(tokenizer.vocab_size)
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "key": key, "dtype": dtype.name}
    for split in SPLITS:
        store = _SequenceStore()
        pair_rows: list[tuple[int, int, int]] = []
        prompt_rows: list[int] = []
        prompt_texts: list[str] = []
        for index, (messages, pairs) in enumerate(groups.values()):
            if (index in val) != (split == "val"):
                continue
            prompt = template.generation_prompt(messages)
            prompt_rows.append(store.add(_tail(prompt, cfg.seq_len // 2)))  # room to generate for PPO
            prompt_texts.append(_prompt_text(messages))
            responses: dict[str, list[int]] = {}
            for pair in pairs:
                for text in (pair.chosen, pair.rejected):
                    if text not in responses:
                        responses[text] = response_ids(template, messages, prompt, text)
                fitted = fit_pair(prompt, responses[pair.chosen], responses[pair.rejected], cfg.seq_len,
                                  cfg.sft_overflow)
                if fitted is None:
                    counts["dropped"] += 1
                    continue
                if sum(map(len, fitted)) < len(prompt) + len(responses[pair.chosen]) + len(responses[pair.rejected]):
                    counts["truncated"] += 1
                counts["kept"] += 1
                pair_rows.append((store.add(fitted[0]), store.add(fitted[1]), store.add(fitted[2])))
        if not pair_rows:
            raise DataError(f"{source}: no {split} pairs left after the data.sft_overflow={cfg.sft_overflow} "
                            f"policy (seq_len {cfg.seq_len}); expected at least one per split")
        tokens = write_sequences(directory, split, store.sequences, dtype)
        np.save(directory / f"{split}_pairs.npy", np.array(pair_rows, dtype=np.int64).reshape(-1, 3))
        np.save(directory / f"{split}_prompts.npy", np.array(prompt_rows, dtype=np.int64))
        (directory / f"{split}_prompt_texts.json").write_text(json.dumps(prompt_texts, ensure_ascii=False),
                                                              encoding="utf-8")
        manifest.update({f"{split}_pairs": len(pair_rows), f"{split}_prompts": len(prompt_rows),
                         f"{split}_sequences": len(store.sequences), f"{split}_tokens": tokens})
    return finish_chat_cache(directory, manifest, cfg, tokenizer, template, fingerprint, counts)


def prepare_preference_data(cfg: DataConfig, cache_root: Path | str, tokenizer: Tokenizer | None = None) -> Path:
    """Tokenize the preferences of ``cfg`` once (or reuse an identical earlier result); return the directory."""
    tokenizer = resolve_tokenizer(cfg, tokenizer, _NEEDS_TOKENIZER)
    final, manifest, built = prepare_chat_cache("preference", FORMAT_VERSION, cfg, cache_root, tokenizer,
                                                PREFERENCE_EXTENSIONS, _read_manifest, _build)
    counts = manifest["counts"]
    logger.info(
        "%s preference data %s (%s template): %d rows, %d prompts, %d pairs -> kept %d (truncated %d), "
        "dropped %d (data.sft_overflow=%s, seq_len %d); %d train / %d val pairs, %d / %d prompts",
        "Built" if built else "Reusing", final, manifest["template"], counts["rows"], counts["prompts"],
        counts["pairs"], counts["kept"], counts["truncated"], counts["dropped"], manifest["sft_overflow"],
        manifest["seq_len"], manifest["train_pairs"], manifest["val_pairs"], manifest["train_prompts"],
        manifest["val_prompts"],
    )
    return final


# -- serving ---------------------------------------------------------------------------------------


class PreferencePairs(SplitSequences):
    """One split of a cache: ``pair(i) -> (prompt_ids, chosen_ids, rejected_ids)`` int64 arrays."""

    def __init__(self, directory: Path, split: str, dtype: str) -> None:
        super().__init__(directory, split, dtype)
        self.pairs = np.load(self.directory / f"{split}_pairs.npy")
        self.prompt_sequences = np.load(self.directory / f"{split}_prompts.npy")

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        prompt, chosen, rejected = self.pairs[index]
        return self.sequence(prompt), self.sequence(chosen), self.sequence(rejected)

    __getitem__ = pair

    def prompts(self) -> list[np.ndarray]:
        """Each distinct prompt of the split once (generation prompts, at most ``seq_len // 2`` tokens)."""
        return [self.sequence(index) for index in self.prompt_sequences]

    def prompt_texts(self) -> list[str]:
        """The last user message of each prompt of :meth:`prompts`, for the annotator."""
        return json.loads((self.directory / f"{self.split}_prompt_texts.json").read_text(encoding="utf-8"))


@dataclass
class PreferenceData:
    train: PreferencePairs
    val: PreferencePairs
    tokenizer: Tokenizer
    manifest: dict[str, Any]


def load_preference_data(cache_dir: Path | str) -> PreferenceData:
    """Open a directory written by :func:`prepare_preference_data` (memory-mapped; instant)."""
    return PreferenceData(*open_chat_cache(cache_dir, _read_manifest, FORMAT_VERSION, "preference",
                                           "run prepare_preference_data", PreferencePairs))


def collate_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]],
                  pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs as ONE batch of ``2B`` rows, so chosen and rejected share a single forward pass.

    Row ``i < B`` is ``prompt_i + chosen_i``, row ``B + i`` is ``prompt_i + rejected_i``, right-padded
    with ``pad_id`` to the longest row ``T``:

    - ``input_ids`` ``(2B, T)`` long;
    - ``attention_mask`` ``(2B, T)`` long, 1 on real tokens;
    - ``labels`` ``(2B, T)``: ``labels[t] = input_ids[t + 1]`` where ``t + 1`` is a response token,
      else -100 (as SFT), so summing log p(labels) gives the response log-likelihood (DPO, PPO);
    - ``last_index`` ``(2B,)``: position of the last response token (the end-of-turn unless the
      response was truncated), where a reward model reads its score.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = ([(list(p), list(c)) for p, c, _ in pairs] + [(list(p), list(r)) for p, _, r in pairs])
    if any(not response for _, response in rows):
        raise ValueError("collate_pairs got an empty response; every response needs at least one token")
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    last_index = torch.empty(len(rows), dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        ids = torch.tensor(prompt + response, dtype=torch.long)
        n, start = len(ids), len(prompt)
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        # Positions start-1 .. n-2 predict the response tokens start .. n-1.
        labels[row, max(start - 1, 0):n - 1] = ids[max(start, 1):n]
        last_index[row] = n - 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "last_index": last_index}


# -- prompt sets (PPO) -----------------------------------------------------------------------------


@dataclass
class PromptSet:
    """Generation prompts (token ids) and their last user message (text, for the annotator) per split."""

    train: list[list[int]]
    val: list[list[int]]
    train_texts: list[str]
    val_texts: list[str]


def load_prompts(cfg: DataConfig, tokenizer: Tokenizer | None = None, max_len: int | None = None) -> PromptSet:
    """The distinct prompts of ``cfg`` (preference or SFT data, see :func:`iter_prompts`), split as the
    preference cache splits them; each is the template's generation prompt, keeping its LAST
    ``max_len`` tokens (default ``data.seq_len // 2``, so that a generation of as many tokens fits)."""
    tokenizer = resolve_tokenizer(cfg, tokenizer, _NEEDS_TOKENIZER)
    template = chat_template_for(tokenizer, cfg.chat_template)
    max_len = max_len or cfg.seq_len // 2
    prompts: dict[str, Messages] = {}
    for _, messages in iter_prompts(cfg):
        prompts.setdefault(_prompt_key(messages), messages)
    val = _val_prompts(len(prompts), cfg.val_fraction, str(cfg.path or cfg.dataset))
    result = PromptSet([], [], [], [])
    for index, messages in enumerate(prompts.values()):
        split = "val" if index in val else "train"
        getattr(result, split).append(_tail(template.generation_prompt(messages), max_len))
        getattr(result, f"{split}_texts").append(_prompt_text(messages))
    return result


# -- the embedded default --------------------------------------------------------------------------
#
# No human preference set ships in a package registry, so `data=prefs` is generated from the embedded
# chatterbot corpus and ranked by RuleAnnotator (the documented stand-in for human rankers). The
# `chitchat-dataset` package has human ratings, but per conversation, not per answer, so it cannot
# rank answers to one prompt; it was not taken.

PREFS_GENERATOR_VERSION = 1
PREFS_FILE = "prefs.jsonl"
_PREFS_SEED = 1729
_MAX_ANSWER_WORDS = 40  # longer and multi-line answers (code listings) are left out: chit-chat regime
_MIN_MARGIN = 0.2  # rankers leave near-ties unranked; only clearly separated candidates are kept
_RUDE_PREFIXES = ("Whatever. ", "Ugh, what a stupid question. ", "Duh. ")
_POLITE_PREFIXES = ("Thanks for asking! ", "Glad you asked. ")


def _candidates(answer: str, others: Sequence[str], rng: random.Random) -> list[str]:
    """Candidate answers to one question: its real answer first, then flawed and polished variants."""
    answer = answer.strip()
    picks = [others[rng.randrange(len(others))] for _ in range(3)]
    words = answer.split()
    return [
        answer,                                                     # the corpus answer
        rng.choice(_POLITE_PREFIXES) + answer,                      # polite
        rng.choice(_RUDE_PREFIXES) + answer,                        # impolite
        " ".join(words[:max(1, len(words) // 2)]).rstrip(".!?,;:…") if len(words) > 1 else "",  # cut mid-sentence
        " ".join([answer] * 3),                                     # looping repetition
        f"{answer} {picks[0].strip()} {picks[1].strip()}",          # rambling: two more answers appended
        picks[2].strip(),                                           # off-topic: another question's answer
    ]


def rule_ranked_rows(questions: Sequence[tuple[str, str, str]], seed: int = _PREFS_SEED,
                     annotator: RuleAnnotator | None = None) -> list[dict[str, Any]]:
    """K-wise rows ``{"prompt", "responses", "ranking", "annotator", "source"}`` for ``(source, question,
    answer)`` triples, ranked by ``annotator``. Deterministic for a given input order and ``seed``.

    A candidate is kept (in the order of :func:`_candidates`) only if it is non-empty, differs from the
    kept ones and its score is at least ``_MIN_MARGIN`` away from each of theirs.
    """
    annotator = annotator or RuleAnnotator()
    rng = random.Random(seed)
    answers = [answer for _, _, answer in questions]
    rows = []
    for index, (source, question, answer) in enumerate(questions):
        others = answers[:index] + answers[index + 1:]
        kept: list[str] = []
        scores: list[float] = []
        for candidate in _candidates(answer, others, rng):
            score = annotator.score(question, candidate)
            if (candidate.strip() and candidate.strip() not in {k.strip() for k in kept}
                    and all(abs(score - s) >= _MIN_MARGIN - 1e-9 for s in scores)):
                kept.append(candidate)
                scores.append(score)
        if len(kept) < 2:
            continue
        rows.append({"prompt": question, "responses": kept, "ranking": annotator.rank(question, kept),
                     "annotator": annotator.name, "source": source})
    return rows


def chatterbot_questions(root: Path) -> list[tuple[str, str, str]]:
    """``(file:line, question, answer)`` of each distinct first question of the chatterbot corpus at ``root``."""
    seen: set[str] = set()
    result = []
    for file in list_files(root, CHATTERBOT_EXTENSIONS):
        for line_no, messages in read_chatterbot_yaml(file):
            question, answer = messages[0]["content"].strip(), messages[1]["content"].strip()
            if (not question or not answer or question in seen or "\n" in answer
                    or len(answer.split()) > _MAX_ANSWER_WORDS):
                continue
            seen.add(question)
            result.append((f"{file.relative_to(root).as_posix()}:{line_no}", question, answer))
    return result


def embedded_prefs_path(cache_root: Path | str | None = None) -> Path:
    """The embedded preference file (``data=prefs``), generated once from the chatterbot corpus.

    For each distinct first question of a chatterbot conversation (its first answer, when that is one
    line of at most 40 words; the corpus repeats some questions with other answers), the
    candidates are, in this order: its real answer; a polite variant ("Thanks for asking! ..."); an
    impolite one ("Whatever. ..."); an unfinished one (cut after half its words, final punctuation
    removed); a looping one (the answer three times); a rambling one (two other random answers
    appended); an off-topic one (another question's answer). Near-ties with an earlier candidate
    are dropped (see :func:`rule_ranked_rows`), so the clear-cut variants come first, and
    :class:`~llmsys.eval.RuleAnnotator` ranks the rest into a K-wise row, the format a human-ranking
    tool will write. The file lives in ``<cache_root>/prefs/<key>/prefs.jsonl`` (default cache root
    ``$LLMSYS_HOME/data``), written atomically; ``key`` hashes the corpus files, the generator version
    and the annotator, so changing either regenerates it.
    """
    root = embedded_corpus_path("chatterbot")
    files = list_files(root, CHATTERBOT_EXTENSIONS)
    fingerprint = LocalFiles(root, files, "prefs").fingerprint()
    key = stable_hash("prefs", PREFS_GENERATOR_VERSION, ANNOTATOR_NAME, _PREFS_SEED, fingerprint)
    final = Path(cache_root or llmsys_home() / "data") / "prefs" / key

    def build(directory: Path) -> None:
        rows = rule_ranked_rows(chatterbot_questions(root))
        with (directory / PREFS_FILE).open("w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        logger.info("Generated %d rule-ranked preference rows from %s into %s", len(rows), root, final)

    build_once(final, is_complete=lambda directory: (directory / PREFS_FILE).is_file(), build=build)
    return final / PREFS_FILE
