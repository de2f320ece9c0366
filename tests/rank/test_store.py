"""The rankings file: whole lines under concurrent writers (threads, processes), torn tails, duplicates, resume."""
from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from llmsys.rank.store import DuplicateDecision, RankingStore, StoreError

# Big enough that one line is many pages: an unlocked writer would interleave with another (PIPE_BUF is 4 KiB).
BIG = "x" * 50_000


def _row(annotator: str, item: str, action: str = "rank", **extra) -> dict:
    row = {"action": action, "annotator": annotator, "item": item, "prompt": f"question {item}",
           "responses": ["a", "b"], **extra}
    if action == "rank":
        row["ranking"] = [1, 0]
    return row


def _lines(path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").split("\n")[:-1]]


def test_threads_append_whole_lines(tmp_path):
    store = RankingStore(tmp_path / "rankings.jsonl")
    errors: list[Exception] = []

    def work(who: int) -> None:
        try:
            for n in range(20):
                store.append(_row(f"annotator{who}", f"item{n}", payload=BIG + str(who)))
        except Exception as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(who,)) for who in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    rows = _lines(tmp_path / "rankings.jsonl")
    assert len(rows) == 6 * 20
    assert {(r["annotator"], r["item"]) for r in rows} == {(f"annotator{w}", f"item{n}") for w in range(6) for n in range(20)}
    assert all(r["payload"] == BIG + r["annotator"][-1] and "action" not in r for r in rows)


def _append_from_process(path: str, who: str, count: int, shared_results) -> None:
    store = RankingStore(path)
    for n in range(count):
        store.append(_row(who, f"item{n}", payload=BIG))
    # Both processes try the same (annotator, item) once: exactly one of them may write it.
    try:
        store.append(_row("shared", "same-item", payload=who))
        shared_results.put("written")
    except DuplicateDecision:
        shared_results.put("refused")
    store.close()


def test_two_processes_append_whole_lines_and_agree_on_duplicates(tmp_path):
    path = tmp_path / "rankings.jsonl"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_append_from_process, args=(str(path), who, 30, results)) for who in ("p1", "p2")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert sorted(results.get(timeout=10) for _ in procs) == ["refused", "written"]
    rows = _lines(path)
    assert len(rows) == 2 * 30 + 1
    assert sum(r["annotator"] == "shared" for r in rows) == 1
    assert {(r["annotator"], r["item"]) for r in rows if r["annotator"] != "shared"} == \
        {(who, f"item{n}") for who in ("p1", "p2") for n in range(30)}


def test_a_torn_last_line_is_moved_aside_and_nothing_is_appended_after_it(tmp_path):
    path = tmp_path / "rankings.jsonl"
    good = [json.dumps({k: v for k, v in _row("ann", f"item{n}").items() if k != "action"}) for n in range(2)]
    fragment = '{"prompt": "question item2", "responses": ["a", "b"], "ranki'
    path.write_text("\n".join(good) + "\n" + fragment, encoding="utf-8")
    store = RankingStore(path)
    assert len(store.repairs) == 1 and "torn" in store.repairs[0] and f"{path}:3" in store.repairs[0]
    assert path.read_text(encoding="utf-8") == "\n".join(good) + "\n"  # good lines kept byte for byte
    torn = _lines(tmp_path / "rankings.jsonl.torn")
    assert torn[0]["fragment"] == fragment and torn[0]["offset"] == len("\n".join(good)) + 1
    store.append(_row("ann", "item2"))
    rows = _lines(path)
    assert [r["item"] for r in rows] == ["item0", "item1", "item2"]
    # The resumed annotator has decided all three; a fourth store on the same file agrees.
    assert set(RankingStore(path).decisions("ann")) == {"item0", "item1", "item2"}


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "rankings.jsonl"
    row = {k: v for k, v in _row("ann", "item0").items() if k != "action"}
    path.write_text(json.dumps(row), encoding="utf-8")  # e.g. saved by an editor without the final newline
    store = RankingStore(path)
    assert "kept" in store.repairs[0] and not (tmp_path / "rankings.jsonl.torn").exists()
    store.append(_row("ann", "item1"))
    assert [r["item"] for r in _lines(path)] == ["item0", "item1"]


def test_a_bad_line_before_the_end_refuses_the_file(tmp_path):
    path = tmp_path / "rankings.jsonl"
    path.write_text('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]}\nnot json\n{"x": 1}\n')
    with pytest.raises(StoreError, match=f"{path}:2: not a JSON row"):
        RankingStore(path)


def test_duplicates_are_refused_across_both_files_and_write_nothing(tmp_path):
    path = tmp_path / "rankings.jsonl"
    store = RankingStore(path)
    store.append(_row("ann", "item0"))
    store.append(_row("ann", "item1", action="skip", reason=None))
    store.append(_row("ann", "item2", action="flag", reason="unsafe"))
    before = path.read_bytes(), (tmp_path / "rankings.jsonl.unranked").read_bytes()
    for item, action in (("item0", "rank"), ("item0", "skip"), ("item1", "rank"), ("item2", "flag")):
        with pytest.raises(DuplicateDecision, match=f"annotator 'ann' already .* item '{item}'"):
            store.append(_row("ann", item, action=action))
    assert (path.read_bytes(), (tmp_path / "rankings.jsonl.unranked").read_bytes()) == before
    store.append(_row("other", "item0"))  # another annotator may rank the same item
    assert [r["action"] for r in _lines(tmp_path / "rankings.jsonl.unranked")] == ["skip", "flag"]
    assert "action" not in _lines(path)[0]  # the ranking file holds reader-ready rankings only
    decided = RankingStore(path).decisions("ann")
    assert {item: d.action for item, d in decided.items()} == {"item0": "rank", "item1": "skip", "item2": "flag"}
