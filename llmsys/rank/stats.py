"""``python -m llmsys.rank stats``: what a rankings file holds, and how far its annotators agree.

**Counts**: rankings, distinct items ranked, annotators, skips and flags (from the side file
``<rankings>.unranked``), per annotator; with ``--candidates`` also how many items are still unranked.

**Agreement**, on the items ranked by more than one person: for every such item and every pair of its
annotators, over the ``K(K-1)/2`` pairs of responses (no ties: a ranking is a permutation),

- *pairwise agreement* = concordant / (K(K-1)/2), the fraction of response pairs both put in the same
  order (about the most a reward model trained on the pairs can reproduce; InstructGPT's training
  labellers agreed with each other on ~73% of comparisons, Ouyang et al. 2022);
- *Kendall's tau* = (concordant - discordant) / (K(K-1)/2) = 2 * agreement - 1, from -1 (reversed) to 1;
- *best agreement*: whether both picked the same best response.

Each is the mean over all (item, annotator pair) combinations. A row without an ``annotator`` counts as a
ranking but cannot be compared; a second row by the same annotator for the same item (files joined by
hand) is counted under ``duplicates`` and only the first is used.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from llmsys.rank.candidates import item_id, read_candidates
from llmsys.rank.store import StoreError, side_file


def concordant_pairs(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """``(concordant, discordant)`` response pairs of two rankings of one item (index lists, best first)."""
    if sorted(a) != list(range(len(a))) or sorted(b) != sorted(a):
        raise ValueError(f"rankings {list(a)} and {list(b)} are not permutations of the same responses")
    pos_a = {response: place for place, response in enumerate(a)}
    pos_b = {response: place for place, response in enumerate(b)}
    concordant = discordant = 0
    for i, j in combinations(range(len(a)), 2):
        if (pos_a[i] - pos_a[j]) * (pos_b[i] - pos_b[j]) > 0:
            concordant += 1
        else:
            discordant += 1
    return concordant, discordant


def kendall_tau(a: Sequence[int], b: Sequence[int]) -> float:
    """Kendall's tau of two rankings without ties: (concordant - discordant) / number of pairs."""
    concordant, discordant = concordant_pairs(a, b)
    return (concordant - discordant) / (concordant + discordant)


def pairwise_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """The fraction of response pairs that two rankings order alike."""
    concordant, discordant = concordant_pairs(a, b)
    return concordant / (concordant + discordant)


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` of every whole line; a torn last line (a write that died) is left for the server to
    repair and not read here."""
    with path.open("rb") as stream:
        data = stream.read()
    for line_no, raw in enumerate(data[:data.rfind(b"\n") + 1].splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{where}: not a JSON row ({err})") from None
        if not isinstance(row, dict):
            raise StoreError(f"{where}: a JSON {type(row).__name__}, expected an object")
        yield where, row


def ranking_stats(path: Path | str, candidates: Path | str | None = None) -> dict[str, Any]:
    """The counts and agreement of the module docstring, as a JSON-ready dict."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such rankings file")
    by_item: dict[str, dict[str, list[int]]] = defaultdict(dict)  # item -> annotator -> ranking
    per_annotator: dict[str, Counter] = defaultdict(Counter)
    rankings = anonymous = duplicates = other_rows = 0
    items_ranked: set[str] = set()
    for where, row in _rows(path):
        if "ranking" not in row:
            other_rows += 1  # e.g. a {"prompt", "chosen", "rejected"} pair added by hand
            continue
        ranking, responses = row["ranking"], row.get("responses")
        if not isinstance(responses, list) or not isinstance(ranking, list) or sorted(ranking) != list(range(len(responses))):
            raise StoreError(f"{where}: 'ranking' {ranking!r} is not a permutation of the indices of 'responses'")
        item = row.get("item") if isinstance(row.get("item"), str) else item_id(row.get("prompt"), responses)
        rankings += 1
        items_ranked.add(item)
        annotator = row.get("annotator")
        if not isinstance(annotator, str):
            anonymous += 1
            continue
        if annotator in by_item[item]:
            duplicates += 1
            continue
        by_item[item][annotator] = ranking
        per_annotator[annotator]["ranked"] += 1
    skips = flags = 0
    flagged: list[dict[str, Any]] = []
    unranked = side_file(path, "unranked")
    if unranked.is_file():
        for _, row in _rows(unranked):
            action = row.get("action")
            if action == "skip":
                skips += 1
            elif action == "flag":
                flags += 1
                flagged.append({key: row.get(key) for key in ("item", "annotator", "reason", "time")})
            if isinstance(row.get("annotator"), str) and action in ("skip", "flag"):
                per_annotator[row["annotator"]]["skipped" if action == "skip" else "flagged"] += 1
    taus: list[float] = []
    agreements: list[float] = []
    same_best: list[float] = []
    shared = 0
    for ranked in by_item.values():
        if len(ranked) < 2:
            continue
        shared += 1
        for a, b in combinations(sorted(ranked), 2):
            taus.append(kendall_tau(ranked[a], ranked[b]))
            agreements.append(pairwise_agreement(ranked[a], ranked[b]))
            same_best.append(float(ranked[a][0] == ranked[b][0]))
    report: dict[str, Any] = {
        "rankings": rankings, "items_ranked": len(items_ranked), "annotators": len(per_annotator),
        "skips": skips, "flags": flags, "unattributed_rankings": anonymous, "duplicates": duplicates,
        "other_rows": other_rows,
        "per_annotator": {name: {key: counts[key] for key in ("ranked", "skipped", "flagged")}
                          for name, counts in sorted(per_annotator.items())},
        "items_ranked_by_several": shared, "annotator_pairs": len(taus),
        "pairwise_agreement": sum(agreements) / len(agreements) if agreements else None,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "best_agreement": sum(same_best) / len(same_best) if same_best else None,
        "flagged": flagged,
    }
    if candidates is not None:
        ids = {item.id for item in read_candidates(candidates)}
        report["candidates"] = len(ids)
        report["candidates_unranked"] = len(ids - items_ranked)
    return report


def format_stats(report: dict[str, Any]) -> str:
    """The report as a few lines of text for a terminal."""
    lines = [(f"{report['rankings']} rankings of {report['items_ranked']} items by {report['annotators']} "
              f"annotators; {report['skips']} skips, {report['flags']} flags")]
    if "candidates" in report:
        lines.append(f"candidates: {report['candidates']} items, {report['candidates_unranked']} not ranked by anyone")
    for name, counts in report["per_annotator"].items():
        lines.append(f"  {name}: {counts['ranked']} ranked, {counts['skipped']} skipped, {counts['flagged']} flagged")
    for key, what in (("unattributed_rankings", "rankings without an annotator (not compared)"),
                      ("duplicates", "repeated rankings of an item by the same annotator (first one used)"),
                      ("other_rows", "rows that are not rankings (e.g. chosen/rejected pairs)")):
        if report[key]:
            lines.append(f"{report[key]} {what}")
    if report["annotator_pairs"]:
        lines.append(f"agreement on {report['items_ranked_by_several']} items ranked by more than one person "
                     f"({report['annotator_pairs']} annotator pairs): pairwise {report['pairwise_agreement']:.3f}, "
                     f"Kendall's tau {report['kendall_tau']:.3f}, same best {report['best_agreement']:.3f}")
    else:
        lines.append("agreement: no item was ranked by more than one person yet")
    for flag in report["flagged"]:
        lines.append(f"  flagged {flag['item']} by {flag['annotator']}: {flag['reason'] or '(no reason given)'}")
    return "\n".join(lines)
