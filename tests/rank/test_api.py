"""The ranking API in-process (FastAPI's TestClient), sampling, the candidates file, the compare data, the CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from llmsys.data import DataError
from llmsys.data.preference import row_to_pairs
from llmsys.eval.probes import load_export
from llmsys.rank.app import create_app, display_order
from llmsys.rank.candidates import (
    Sampling,
    item_id,
    read_candidates,
    read_prompts,
    sample_items,
    write_candidates,
)
from llmsys.rank.compare import CompareError, read_side_by_side
from llmsys.rank.store import RankingStore
from tests.rank.conftest import PROMPTS, hand_items, read_rows

SCRIPT = "<script>window.__pwned = 1; document.title = 'pwned'</script>"


@pytest.fixture
def setup(tmp_path):
    items = hand_items(extra={0: [SCRIPT, "<b>bold?</b>", "plain", "& &amp; <!-- x -->"]})
    store = RankingStore(tmp_path / "rankings.jsonl")
    client = TestClient(create_app(items, store), base_url="http://127.0.0.1:8765")
    yield client, items, tmp_path
    store.close()


def _on_disk(tmp_path) -> tuple[bytes, bytes]:
    return tuple((tmp_path / name).read_bytes() for name in ("rankings.jsonl", "rankings.jsonl.unranked"))


def test_rank_writes_a_row_that_stage_reward_reads(setup):
    client, items, tmp_path = setup
    first = client.get("/api/next", params={"annotator": "alice"}).json()
    assert first["item"]["id"] == items[0].id and first["progress"]["decided"] == 0
    shown = first["item"]["shown"]
    assert sorted(shown) == [0, 1, 2, 3] and shown == display_order("alice", items[0])
    ranking = list(reversed(shown))
    reply = client.post("/api/submit", json={"annotator": "alice", "item": items[0].id, "ranking": ranking,
                                             "shown": shown})
    assert reply.status_code == 200, reply.text
    assert reply.json()["item"]["id"] == items[1].id and reply.json()["progress"]["ranked"] == 1
    [row] = read_rows(tmp_path / "rankings.jsonl")
    assert (row["prompt"], row["responses"], row["ranking"]) == (items[0].prompt, list(items[0].responses), ranking)
    assert (row["item"], row["annotator"], row["model"], row["shown"]) == (items[0].id, "alice", "hand-written", shown)
    assert row["time"].endswith("Z") and row["tokens"] == list(items[0].tokens)
    pairs = row_to_pairs(row, "row")  # exactly what stage=reward does with it
    assert (pairs[0].chosen, pairs[0].rejected) == (items[0].responses[ranking[0]], items[0].responses[ranking[1]])
    assert len(pairs) == 6
    # Skip and flag go to the side file; each annotator resumes at their own next item.
    assert client.post("/api/submit", json={"annotator": "alice", "item": items[1].id, "action": "skip"}).status_code == 200
    assert client.post("/api/submit", json={"annotator": "alice", "item": items[2].id, "action": "flag",
                                            "reason": " gibberish "}).status_code == 200
    side = read_rows(tmp_path / "rankings.jsonl.unranked")
    assert [(r["action"], r["item"], r["reason"]) for r in side] == [("skip", items[1].id, None),
                                                                     ("flag", items[2].id, "gibberish")]
    assert client.get("/api/next", params={"annotator": "alice"}).json()["item"]["id"] == items[3].id
    assert client.get("/api/next", params={"annotator": "bob"}).json()["item"]["id"] == items[0].id


@pytest.mark.parametrize("body,status,message", [
    ({"item": "nope", "ranking": [0, 1, 2, 3]}, 404, "unknown item 'nope'"),
    ({"ranking": [0, 0, 1, 2]}, 422, "field ranking is [0, 0, 1, 2]; expected a permutation of 0..3"),
    ({"ranking": [0, 1, 2]}, 422, "expected a permutation of 0..3"),
    ({"ranking": [0, 1, 2, 3, 4]}, 422, "expected a permutation of 0..3"),
    ({"ranking": ["0", "1", "2", "3"]}, 422, "field ranking.0"),
    ({"ranking": [True, False, 2, 3]}, 422, "field ranking.0"),
    ({}, 422, "field ranking is None"),
    ({"ranking": [0, 1, 2, 3], "shown": [0, 1]}, 422, "field shown"),
    ({"ranking": [0, 1, 2, 3], "reason": "why"}, 422, "reason is for a skip or a flag"),
    ({"action": "skip", "ranking": [0, 1, 2, 3]}, 422, "a skipped or flagged item is not ranked"),
    ({"action": "delete"}, 422, "field action"),
    ({"annotator": "", "ranking": [0, 1, 2, 3]}, 422, "annotator ''"),
    ({"annotator": "a\nb", "ranking": [0, 1, 2, 3]}, 422, "printable characters"),
    ({"annotator": "x" * 65, "ranking": [0, 1, 2, 3]}, 422, "1 to 64"),
    ({"ranking": [0, 1, 2, 3], "extra": 1}, 422, "field extra"),
])
def test_bad_submissions_get_a_clear_4xx_and_change_nothing(setup, body, status, message):
    client, items, tmp_path = setup
    client.post("/api/submit", json={"annotator": "alice", "item": items[1].id, "ranking": [3, 2, 1, 0]})
    before = _on_disk(tmp_path)
    reply = client.post("/api/submit", json={"annotator": "alice", "item": items[0].id, **body})
    assert reply.status_code == status and message in reply.json()["error"], reply.text
    assert _on_disk(tmp_path) == before


def test_a_duplicate_submission_is_a_409_and_changes_nothing(setup):
    client, items, tmp_path = setup
    body = {"annotator": "alice", "item": items[0].id, "ranking": [0, 1, 2, 3]}
    assert client.post("/api/submit", json=body).status_code == 200
    before = _on_disk(tmp_path)
    for again in (body, {**body, "ranking": [3, 2, 1, 0]}, {"annotator": "alice", "item": items[0].id, "action": "skip"}):
        reply = client.post("/api/submit", json=again)
        assert reply.status_code == 409 and "already ranked" in reply.json()["error"]
    assert _on_disk(tmp_path) == before


def test_model_output_is_served_as_json_text_under_a_strict_policy(setup):
    client, _, _ = setup
    reply = client.get("/api/next", params={"annotator": "alice"})
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["item"]["responses"][0] == SCRIPT  # the text itself, for textContent
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for name in ("rank.js", "compare.js"):
        source = client.get(f"/static/{name}").text
        assert "textContent" in source and "innerHTML" not in source and "insertAdjacentHTML" not in source


def test_only_loopback_hosts_without_a_token(setup):
    client, _, _ = setup
    assert client.get("/api/health", headers={"host": "evil.example:8765"}).status_code == 400
    assert client.get("/api/health", headers={"host": "localhost:8765"}).status_code == 200
    assert client.get("/api/health", headers={"host": "[::1]:8765"}).status_code == 200


def test_a_token_guards_every_request(tmp_path):
    store = RankingStore(tmp_path / "rankings.jsonl")
    client = TestClient(create_app(hand_items(), store, token="s3cret", allowed_hosts=None),
                        base_url="http://ranking.example")
    for path in ("/", "/api/health", "/static/rank.js", "/api/next?annotator=a"):
        assert client.get(path).status_code == 401
    assert client.get("/api/health", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
    page = client.get("/?token=s3cret")
    assert page.status_code == 200 and "httponly" in page.headers["set-cookie"].lower()
    assert client.get("/api/next?annotator=a").status_code == 200  # the cookie carries it now
    store.close()


def test_serve_refuses_a_public_address_without_a_token(candidates_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmsys.rank", "serve", "--candidates", str(candidates_file),
                           "--out", str(tmp_path / "r.jsonl"), "--host", "0.0.0.0"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "refusing to serve on 0.0.0.0 without a token" in proc.stderr
    assert not (tmp_path / "r.jsonl").exists()


# -- candidates ------------------------------------------------------------------------------------


def test_sampling_gives_k_distinct_answers_with_stable_ids(tiny_export, tmp_path):
    model, tokenizer = load_export(tiny_export)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    sampling = Sampling(k=3, max_new_tokens=8, seed=7)
    items, left_out = sample_items(model, tokenizer, prompts, sampling, model_name="tiny")
    assert not left_out and [i.prompt for i in items] == PROMPTS[:3]
    for item in items:
        assert len({r.strip() for r in item.responses}) == 3 and all(r.strip() for r in item.responses)
        assert item.id == item_id(item.prompt, item.responses) and item.sampling == sampling.as_dict()
        assert all(1 <= n <= 8 for n in item.tokens)
    again, _ = sample_items(model, tokenizer, prompts, sampling, model_name="tiny")
    assert [i.id for i in again] == [i.id for i in items]  # same export, prompts and seed: same items
    path = write_candidates(tmp_path / "c.jsonl", items)
    assert read_candidates(path) == items


def test_candidates_file_errors_name_the_line(tmp_path):
    path = tmp_path / "c.jsonl"
    good = hand_items()[0].to_row()
    for rows, message in (
        ([good, {"prompt": "p", "responses": ["same", "same "]}], "c.jsonl:2: responses[0] and responses[1] are the same"),
        ([good, {**good, "id": "0000"}], "c.jsonl:2: field 'id' is '0000'"),
        ([good, good], "c.jsonl:2: the same prompt and responses as line 1"),
        ([{"prompt": "p", "responses": ["a", "b"], "tokens": [1]}], "c.jsonl:1: field 'tokens'"),
        ([{"prompt": "p"}], "c.jsonl:1: expected an object with 'prompt' and 'responses'"),
    ):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=re.escape(message)):
            read_candidates(path)


def test_prompts_from_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\none\n")
    assert [m[-1]["content"] for m in read_prompts(tmp_path / "p.txt")] == ["one", "two"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "three", "system": "be brief"}) + "\n")
    assert read_prompts(tmp_path / "p.jsonl") == [[{"role": "system", "content": "be brief"},
                                                   {"role": "user", "content": "three"}]]


# -- the side-by-side data -------------------------------------------------------------------------


def side_by_side(prompts=("q1", "q2"), stages=("base", "sft")) -> dict:
    def answer(stage: str, i: int) -> dict:
        return {"response": f"{stage} says {i}" if i else SCRIPT, "tokens": 4 + 2 * i + len(stage),
                "stopped": stage != "base", "format_ok": i == 0, "score": None if stage == "base" else -0.5 * i}

    return {"max_new_tokens": 48, "score_name": "annotator", "prompts": list(prompts), "stages": list(stages),
            "answers": {s: [answer(s, i) for i in range(len(prompts))] for s in stages}}


def test_compare_summary_and_errors(tmp_path):
    path = tmp_path / "side_by_side.json"
    path.write_text(json.dumps(side_by_side()))
    data = read_side_by_side(path)
    # base: tokens 8 and 10, never stops, format ok on q1 only, no scores; sft: tokens 7 and 9, scores 0, -0.5.
    assert data["summary"]["base"] == {"mean_tokens": 9.0, "stopped": 0.0, "format_ok": 0.5, "mean_score": None}
    assert data["summary"]["sft"] == {"mean_tokens": 8.0, "stopped": 1.0, "format_ok": 0.5, "mean_score": -0.25}
    client = TestClient(create_app([], None, compare=data), base_url="http://127.0.0.1")
    assert client.get("/api/compare").json()["answers"]["base"][0]["response"] == SCRIPT
    assert client.get("/api/next?annotator=a").status_code == 404
    broken = side_by_side()
    broken["answers"]["sft"][1]["tokens"] = "9"
    path.write_text(json.dumps(broken))
    with pytest.raises(CompareError, match=r"field answers.sft\[1\].tokens is \"9\", expected a count"):
        read_side_by_side(path)
    broken = side_by_side()
    broken["answers"]["sft"].pop()
    path.write_text(json.dumps(broken))
    with pytest.raises(CompareError, match="answers.sft is \"1 answers\", expected a list of 2 answers"):
        read_side_by_side(path)


def test_the_pipelines_side_by_side_output_is_read_as_is(tiny_export, tmp_path):
    from llmsys.eval.side_by_side import side_by_side as produce

    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    path = tmp_path / "side_by_side.json"
    path.write_text(json.dumps(produce({"sft": tiny_export, "again": tiny_export}, prompts, max_new_tokens=6)))
    data = read_side_by_side(path)
    assert data["stages"] == ["sft", "again"] and data["prompts"] == PROMPTS[:2]
    assert data["answers"]["sft"] == data["answers"]["again"]  # greedy: the same export answers alike
    assert data["summary"]["sft"]["mean_tokens"] == sum(a["tokens"] for a in data["answers"]["sft"]) / 2
