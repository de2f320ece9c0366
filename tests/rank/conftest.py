"""Fixtures of the ranking tests: a tiny random export, candidates, a real server process, a real browser.

A browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them). Where they
are missing the test skips saying so, except under ``CI=true``, where a missing browser fails the test:
CI must never pass by skipping the page it is meant to check.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from llmsys.config.schema import ModelConfig
from llmsys.data import train_bpe_tokenizer
from llmsys.models import Transformer, save_pretrained
from llmsys.rank.candidates import make_item, write_candidates
from tests.tools import missing_tool

CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"
SERVER_START_S = 60

TOKENIZER_TEXT = ["What is the capital of France? Paris is the capital of France.",
                  "Hello, how are you today? I am fine, thank you.", "Tell me a joke about a cat and a dog."] * 5

PROMPTS = ["What is your name?", "Tell me a joke.", "How are you today?", "What is the capital of France?",
           "Say something kind.", "What do cats eat?", "Where is the sun?", "Why is the sky blue?"]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A random 2-layer model with a small chat-ready BPE tokenizer, exported like a stage's ``final/``."""
    root = tmp_path_factory.mktemp("tiny_export")
    tokenizer = train_bpe_tokenizer(TOKENIZER_TEXT, 320)
    tokenizer.save(root / "tokenizer")
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=128)
    torch.manual_seed(0)
    return save_pretrained(Transformer(cfg).state_dict(), cfg, root / "final", tokenizer_dir=root / "tokenizer",
                           extra={"stage": "sft"})


def hand_items(prompts=PROMPTS, k: int = 4, *, extra: dict[int, list[str]] | None = None):
    """Items written by hand: response j of prompt i is recognisable in a page and a file."""
    items = []
    for i, prompt in enumerate(prompts):
        responses = (extra or {}).get(i) or [f"answer {j} to question {i}: " + "word " * (j + 1) for j in range(k)]
        items.append(make_item(prompt, responses, tokens=tuple(3 + j for j in range(len(responses))),
                               stopped=tuple(j % 2 == 0 for j in range(len(responses))), model="hand-written",
                               sampling={"k": len(responses)}))
    return items


@pytest.fixture
def candidates_file(tmp_path) -> Path:
    return write_candidates(tmp_path / "candidates.jsonl", hand_items())


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- a real server process -------------------------------------------------------------------------


class Server:
    """``python -m llmsys.rank serve ...`` as a child process on a free port (started by :meth:`start`)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args, self.log = args, log
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.port = 0

    def start(self, port: int = 0) -> Server:
        stream = self.log.open("a")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "llmsys.rank", "serve", *self.args, "--port", str(port)],
                                     stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            found = re.findall(r"serving http://([^/\s]+)/", self.log.read_text())
            if found:
                self.url = f"http://{found[-1]}"
                self.port = int(found[-1].rsplit(":", 1)[1])
                try:
                    if httpx.get(f"{self.url}/api/health", timeout=2).status_code in (200, 401):
                        return self
                except httpx.HTTPError:
                    pass
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"the server did not answer within {SERVER_START_S} s:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def server_factory(tmp_path) -> Iterator:
    started: list[Server] = []

    def make(*args: str) -> Server:
        server = Server(list(args), tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# -- a real browser --------------------------------------------------------------------------------


def _chromium() -> tuple[str, str]:
    binary = next((found for name in CHROMIUM if (found := shutil.which(name))), None)
    driver = shutil.which(CHROMEDRIVER)
    if binary is None or driver is None:
        missing_tool("no chromium/chromedriver on PATH: `apt-get install -y chromium chromium-driver` "
                     "(Debian) for the browser tests")
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing_tool("selenium is not installed (pip install -e '.[dev]')")
    return binary, driver


@pytest.fixture
def browser_factory(tmp_path) -> Iterator:
    """Headless Chromium sessions driven by Selenium (each with its own profile); all quit at the end."""
    binary, driver = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    sessions = []

    def make():
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1000", f"--user-data-dir={tmp_path / f'profile{len(sessions)}'}"):
            options.add_argument(flag)
        # Naming the driver keeps Selenium Manager from trying to download one (no network here).
        session = webdriver.Chrome(options=options, service=Service(driver))
        session.set_page_load_timeout(60)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.quit()
