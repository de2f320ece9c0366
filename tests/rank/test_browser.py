"""The ranking page in a real browser (headless Chromium driven by Selenium) against a real server process.

Ranking by keys alone and by dragging, skip and flag, two annotators at once, a ``kill -9`` of the server
between two submissions, and model output that tries to run a script. Each test reads the rankings file
afterwards: what the page confirmed must be there, in the form ``stage=reward`` reads.
"""
from __future__ import annotations

import json
import threading

import pytest

from llmsys.data.preference import row_to_pairs
from llmsys.rank.candidates import read_candidates, write_candidates
from llmsys.rank.stats import ranking_stats
from tests.rank.conftest import PROMPTS, hand_items, read_rows
from tests.rank.test_api import SCRIPT, side_by_side

WAIT_S = 30
ONERROR = '<img src="x" onerror="window.__pwned = 2; document.title = \'pwned\'">'


def _selenium():
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    return ActionChains, By, Keys, WebDriverWait


def responses(driver) -> list:
    _, By, _, _ = _selenium()
    return driver.find_elements(By.CSS_SELECTOR, "#responses > li.response")


def shown_item(driver) -> str:
    _, By, _, _ = _selenium()
    return driver.find_element(By.ID, "responses").get_attribute("data-item")


def order(driver) -> list[int]:
    return [int(li.get_attribute("data-index")) for li in responses(driver)]


def open_page(driver, url: str, annotator: str) -> str:
    """Open the page as ``annotator``; the id of the item it shows."""
    _, _, _, WebDriverWait = _selenium()
    driver.get(f"{url}/?annotator={annotator}")
    WebDriverWait(driver, WAIT_S).until(lambda d: len(responses(d)) > 0 and shown_item(d))
    return shown_item(driver)


def wait_for_next(driver, previous: str) -> str:
    """Wait until the page has confirmed a decision on ``previous`` and shows the next item (or is done)."""
    _, By, _, WebDriverWait = _selenium()

    def moved_on(d) -> bool:
        status = d.find_element(By.ID, "status").text
        return shown_item(d) != previous or "All done" in status

    WebDriverWait(driver, WAIT_S).until(moved_on)
    status = driver.find_element(By.ID, "status")
    assert "error" not in (status.get_attribute("class") or ""), status.text
    return shown_item(driver)


def keys(driver, *sequence) -> None:
    """Press keys on the focused element; a tuple ``(modifier, key)`` is a chord."""
    ActionChains, _, _, _ = _selenium()
    chain = ActionChains(driver)
    for key in sequence:
        if isinstance(key, tuple):
            chain.key_down(key[0]).send_keys(key[1]).key_up(key[0])
        else:
            chain.send_keys(key)
    chain.perform()


@pytest.fixture
def served(candidates_file, tmp_path, server_factory):
    out = tmp_path / "rankings.jsonl"
    server = server_factory("--candidates", str(candidates_file), "--out", str(out)).start()
    return server, read_candidates(candidates_file), out


def test_rank_skip_and_flag_by_keyboard_alone(served, browser_factory):
    server, items, out = served
    _, By, Keys, _ = _selenium()
    driver = browser_factory()
    first = open_page(driver, server.url, "alice")
    assert first == items[0].id
    s = order(driver)  # the shuffled order shown: s[0] .. s[3], top to bottom
    assert sorted(s) == [0, 1, 2, 3]
    assert driver.switch_to.active_element.get_attribute("data-index") == str(s[0])  # the top one has focus
    # Start [s0 s1 s2 s3], focus s0.  Shift+Down -> [s1 s0 s2 s3];  Down: focus s2;  "1" -> [s2 s1 s0 s3];
    # Down, Down: focus s0;  Shift+Up -> [s2 s0 s1 s3];  "4" -> [s2 s1 s3 s0].
    keys(driver, (Keys.SHIFT, Keys.ARROW_DOWN), Keys.ARROW_DOWN, "1", Keys.ARROW_DOWN, "j",
         (Keys.SHIFT, Keys.ARROW_UP), "4")
    expected = [s[2], s[1], s[3], s[0]]
    assert order(driver) == expected
    assert [li.find_element(By.CLASS_NAME, "place").text for li in responses(driver)] == ["1", "2", "3", "4"]
    keys(driver, Keys.ENTER)
    second = wait_for_next(driver, first)
    assert second == items[1].id
    [row] = read_rows(out)
    assert (row["item"], row["annotator"], row["ranking"], row["shown"]) == (first, "alice", expected, s)
    assert len(row_to_pairs(row, "row")) == 6
    keys(driver, "s")  # skip the second item
    third = wait_for_next(driver, second)
    reason = driver.find_element(By.ID, "reason")
    reason.send_keys("garbled text")
    responses(driver)[0].click()  # back on a response: F flags (a key typed into the reason box is text)
    keys(driver, "f")
    wait_for_next(driver, third)
    side = read_rows(out.with_name("rankings.jsonl.unranked"))
    assert [(r["action"], r["item"], r["reason"]) for r in side] == [("skip", second, None),
                                                                     ("flag", third, "garbled text")]
    assert len(read_rows(out)) == 1  # skips and flags never enter the rankings file
    assert "Item 4 of 8 · 1 ranked · 1 skipped · 1 flagged" in driver.find_element(By.ID, "progress").text


def test_rank_by_dragging(served, browser_factory):
    server, items, out = served
    ActionChains, _, Keys, _ = _selenium()
    driver = browser_factory()
    first = open_page(driver, server.url, "bob")
    s = order(driver)
    lis = responses(driver)
    height = lis[0].size["height"]
    # The bottom response onto the top half of the top one: [s3 s0 s1 s2].
    (ActionChains(driver).click_and_hold(lis[3]).move_to_element_with_offset(lis[0], 0, -height // 2 + 3)
     .move_by_offset(0, 1).release().perform())
    assert order(driver) == [s[3], s[0], s[1], s[2]]
    # The second one (s0) below the bottom half of the last one: [s3 s1 s2 s0].
    lis = responses(driver)
    (ActionChains(driver).click_and_hold(lis[1]).move_to_element_with_offset(lis[3], 0, height // 2 - 3)
     .move_by_offset(0, 1).release().perform())
    expected = [s[3], s[1], s[2], s[0]]
    assert order(driver) == expected
    keys(driver, Keys.ENTER)
    wait_for_next(driver, first)
    [row] = read_rows(out)
    assert (row["item"], row["annotator"], row["ranking"]) == (items[0].id, "bob", expected)


def test_two_annotators_at_once(served, browser_factory):
    server, items, out = served
    _, _, Keys, _ = _selenium()
    drivers = {name: browser_factory() for name in ("alice", "bob")}
    errors: list[Exception] = []

    def annotate(name: str) -> None:
        try:
            driver = drivers[name]
            current = open_page(driver, server.url, name)
            for _ in range(4):
                keys(driver, (Keys.SHIFT, Keys.ARROW_DOWN), Keys.ENTER)
                current = wait_for_next(driver, current)
        except Exception as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=annotate, args=(name,)) for name in drivers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    rows = read_rows(out)  # every line whole JSON
    assert len(rows) == 8
    for name in drivers:
        assert [r["item"] for r in rows if r["annotator"] == name] == [item.id for item in items[:4]]
    report = ranking_stats(out)
    assert (report["annotators"], report["items_ranked_by_several"], report["annotator_pairs"]) == (2, 4, 4)


@pytest.mark.slow  # ~20 s: samples candidates at start-up, starts the server twice
def test_a_kill_between_two_submissions_loses_nothing_and_the_page_resumes(tiny_export, tmp_path, server_factory,
                                                                            browser_factory):
    _, By, Keys, WebDriverWait = _selenium()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    out = tmp_path / "rankings.jsonl"
    args = ["--model", str(tiny_export), "--prompts", str(prompts), "--k", "3", "--max-new-tokens", "8",
            "--out", str(out)]
    server = server_factory(*args).start()
    candidates_path = tmp_path / "rankings.jsonl.candidates"
    sampled = candidates_path.read_bytes()
    items = read_candidates(candidates_path)
    driver = browser_factory()
    first = open_page(driver, server.url, "carol")
    keys(driver, Keys.ENTER)
    wait_for_next(driver, first)
    server.kill()  # SIGKILL right after the page confirmed: no clean shutdown
    restarted = server_factory(*args).start(port=server.port)
    assert "reusing the candidates" in restarted.log.read_text()
    assert candidates_path.read_bytes() == sampled  # the same items, so the same ids
    driver.refresh()
    WebDriverWait(driver, WAIT_S).until(lambda d: shown_item(d) == items[1].id)
    assert "Item 2 of 4 · 1 ranked" in driver.find_element(By.ID, "progress").text
    keys(driver, (Keys.SHIFT, Keys.ARROW_DOWN), Keys.ENTER)
    wait_for_next(driver, items[1].id)
    rows = read_rows(out)
    assert [(r["item"], r["annotator"]) for r in rows] == [(items[0].id, "carol"), (items[1].id, "carol")]
    assert all(r["model"] == str(tiny_export) and r["sampling"]["k"] == 3 for r in rows)
    for row in rows:
        row_to_pairs(row, "row")


def test_model_output_that_looks_like_markup_stays_text(tmp_path, server_factory, browser_factory):
    _, By, _, _ = _selenium()
    items = hand_items(prompts=[f"{ONERROR} what now?", "second"],
                       extra={0: [SCRIPT, ONERROR, "<b>not bold</b>", "fine"]})
    candidates = write_candidates(tmp_path / "candidates.jsonl", items)
    compare = tmp_path / "side_by_side.json"
    compare.write_text(json.dumps(side_by_side(prompts=(ONERROR, "q2"))))
    server = server_factory("--candidates", str(candidates), "--out", str(tmp_path / "r.jsonl"),
                            "--compare", str(compare)).start()
    driver = browser_factory()
    open_page(driver, server.url, "dave")
    texts = {int(li.get_attribute("data-index")): li.find_element(By.CLASS_NAME, "text").text for li in responses(driver)}
    assert texts == dict(enumerate(items[0].responses))  # shown literally
    assert ONERROR in driver.find_element(By.ID, "prompt").text
    assert driver.find_elements(By.CSS_SELECTOR, "main script, main img, main b") == []
    assert driver.execute_script("return window.__pwned === undefined") is True
    assert driver.title == "llmsys · rank responses"
    driver.get(f"{server.url}/compare")
    _selenium()[3](driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#summary tbody tr"))
    assert [tr.get_attribute("data-stage") for tr in driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")] == \
        ["base", "sft"]
    cards = driver.find_elements(By.CSS_SELECTOR, ".answer .text")
    assert [c.text for c in cards] == [SCRIPT, SCRIPT, "base says 1", "sft says 1"]
    assert ONERROR in driver.find_element(By.ID, "prompts").text
    assert driver.find_elements(By.CSS_SELECTOR, "main script, main img") == []
    assert driver.execute_script("return window.__pwned === undefined") is True
    assert driver.title == "llmsys · stages side by side"
