"""The embedded preference default (``data=prefs``): rule-ranked rows generated once from the chatterbot corpus.

No human preference set ships in a package registry, so ``data=prefs`` is generated from the
embedded chatterbot corpus and ranked by :class:`~llmsys.rlhf.RuleAnnotator` (the documented
stand-in for human rankers). The `chitchat-dataset` package has human ratings, but per conversation,
not per answer, so it cannot rank answers to one prompt; it was not taken. The rows are K-wise
``{"prompt", "responses", "ranking"}``, the format a human-ranking tool will write, read back by
:mod:`llmsys.data.preference` like any other preference file.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmsys.paths import CorpusError, data_home, packaged_corpus_dir
from llmsys.rlhf.rewards import ANNOTATOR_NAME, RuleAnnotator
from llmsys.data.cache import build_once, stable_hash
from llmsys.data.chatterbot import CHATTERBOT_EXTENSIONS, read_chatterbot_yaml
from llmsys.data.sources import DataError, LocalFiles, list_files

logger = logging.getLogger(__name__)

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
    :class:`~llmsys.rlhf.RuleAnnotator` ranks the rest into a K-wise row, the format a human-ranking
    tool will write. The file lives in ``<cache_root>/prefs/<key>/prefs.jsonl`` (default cache root
    ``$LLMSYS_HOME/data``), written atomically; ``key`` hashes the corpus files, the generator version
    and the annotator, so changing either regenerates it. (``${llmsys.corpus:prefs}`` names the fixed
    link ``$LLMSYS_HOME/data/prefs/prefs.jsonl`` to it: :func:`llmsys.data.embedded.prepare_generated_corpus`.)
    """
    try:
        root = packaged_corpus_dir("chatterbot")
    except CorpusError as err:
        raise DataError(str(err)) from None
    files = list_files(root, CHATTERBOT_EXTENSIONS)
    fingerprint = LocalFiles(root, files, "prefs").fingerprint()
    key = stable_hash("prefs", PREFS_GENERATOR_VERSION, ANNOTATOR_NAME, _PREFS_SEED, fingerprint)
    final = Path(cache_root or data_home()) / "prefs" / key

    def build(directory: Path) -> None:
        rows = rule_ranked_rows(chatterbot_questions(root))
        with (directory / PREFS_FILE).open("w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        logger.info("Generated %d rule-ranked preference rows from %s into %s", len(rows), root, final)

    build_once(final, is_complete=lambda directory: (directory / PREFS_FILE).is_file(), build=build)
    return final / PREFS_FILE
