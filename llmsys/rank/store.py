"""The rankings file: append-only JSON Lines that a crash, a kill or a second server cannot corrupt.

**Files.** ``rankings.jsonl`` holds only rankings, one row per submission, in exactly the form
``stage=reward`` reads (:mod:`llmsys.data.preference`: ``{"prompt", "responses", "ranking"}``,
``ranking`` the indices of ``responses`` best first), plus fields that reader ignores: ``item``,
``annotator``, ``time`` (UTC, ISO 8601), ``model``, ``sampling``, ``tokens``, ``stopped`` and
``shown`` (the order the page showed the responses in). Skipped and flagged items are decisions
too, but the preference reader accepts no row without a ranking, so they go to the side file
``rankings.jsonl.unranked`` (``{"action": "skip"|"flag", "item", "annotator", "time", "reason",
...}``); its suffix keeps it out of ``data.path=<folder>`` as well.

**One writer at a time, whole lines only.** Every append takes a process-wide lock and then
``fcntl.flock`` on ``rankings.jsonl`` (so two server processes on one file exclude each other too),
first reads whatever other processes appended since (so a duplicate is caught whoever wrote the first
row), writes the whole line with one ``write`` on an ``O_APPEND`` descriptor, then ``flush`` +
``os.fsync`` before returning: the HTTP 200 that confirms a submission comes after the line is on
disk, so a crash or ``kill -9`` loses nothing the page confirmed.

**A torn last line** (bytes after the last newline) can only be a write that died half-way: it was
never confirmed. Under the lock it is moved to ``rankings.jsonl.torn`` (as a JSON row holding the
fragment) and cut off, with a warning, so the file stays readable by ``stage=reward`` and nothing is
appended after a fragment. A last line without its newline that is a whole, valid row (a file edited
by hand) is kept and given its newline. A bad line anywhere else stops the server with its
``file:line``: a file the trainer cannot read must not grow.

**Resuming.** The decisions read back (``annotator``, ``item``, action) tell each annotator where they
stopped; a second decision on the same item by the same annotator is refused
(:class:`DuplicateDecision`) and nothing is written.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ACTIONS = ("rank", "skip", "flag")


class StoreError(ValueError):
    """The rankings file cannot be used; the message names the file and line."""


class DuplicateDecision(ValueError):
    """This annotator already decided this item (ranked, skipped or flagged it)."""


def side_file(path: Path, what: str) -> Path:
    """``rankings.jsonl`` -> ``rankings.jsonl.<what>``: beside it, never read as preference data."""
    return path.with_name(f"{path.name}.{what}")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Decision:
    action: str
    time: str | None


class _Log:
    """One append-only JSON Lines file: its write descriptor and how far it has been read."""

    def __init__(self, path: Path) -> None:
        created = not path.exists()
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        if created:  # the new directory entry must survive a crash as well as the lines
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self.read_upto = 0  # bytes parsed so far (always just after a newline)
        self.lines = 0

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # one write in practice; a short write would be continued, still under the lock
            written = os.write(self.fd, view)
            view = view[written:]
        os.fsync(self.fd)


class RankingStore:
    """The rankings file and its side file (see the module docstring); safe for threads and processes."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.unranked_path = side_file(self.path, "unranked")
        self.torn_path = side_file(self.path, "torn")
        self._thread_lock = threading.Lock()
        self._logs = {"rank": _Log(self.path), "unranked": _Log(self.unranked_path)}
        self._decided: dict[tuple[str, str], Decision] = {}  # (annotator, item) -> first decision
        self.repairs: list[str] = []  # what start-up or a later catch-up fixed, for the log and the tests
        with self._locked():
            pass

    def close(self) -> None:
        for log in self._logs.values():
            os.close(log.fd)

    # -- reading -----------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            lock_fd = self._logs["rank"].fd
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            try:
                for log in self._logs.values():
                    self._catch_up(log)
                yield
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _catch_up(self, log: _Log) -> None:
        """Parse what was appended since the last read; repair a torn tail (the lock is held)."""
        with log.path.open("rb") as stream:
            stream.seek(log.read_upto)
            data = stream.read()
        if not data:
            return
        cut = data.rfind(b"\n") + 1
        complete, tail = data[:cut], data[cut:]
        for raw in complete.splitlines():
            log.lines += 1
            self._read_row(raw, f"{log.path}:{log.lines}", log is self._logs["rank"], strict=True)
        log.read_upto += len(complete)
        if tail:
            self._repair_tail(log, tail)

    def _repair_tail(self, log: _Log, tail: bytes) -> None:
        where = f"{log.path}:{log.lines + 1}"
        if self._read_row(tail, where, log is self._logs["rank"], strict=False):
            log.append(b"\n")  # a whole row that only lacked its newline (written by hand): keep it
            log.lines += 1
            log.read_upto += len(tail) + 1
            message = f"{where}: the last line had no newline; it is a whole row, kept, newline added"
        else:
            torn = {"file": str(log.path), "offset": log.read_upto, "time": utc_now(),
                    "fragment": tail.decode("utf-8", errors="replace")}
            with self.torn_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(torn, ensure_ascii=False) + "\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.ftruncate(log.fd, log.read_upto)
            os.fsync(log.fd)
            message = (f"{where}: removed a torn last line ({len(tail)} bytes without a newline: a write that died "
                       f"half-way, never confirmed); kept in {self.torn_path}")
        logger.warning(message)
        self.repairs.append(message)

    def _read_row(self, raw: bytes, where: str, ranking_file: bool, strict: bool) -> bool:
        """Record the decision of one line; False for a line that is not a whole row (only when not strict)."""
        if not raw.strip():
            return True
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if not strict:
                return False
            raise StoreError(f"{where}: not a JSON row ({err}); the rankings file must stay readable by "
                             f"stage=reward: fix or remove that line") from None
        if not isinstance(row, dict):
            if not strict:
                return False
            raise StoreError(f"{where}: a JSON {type(row).__name__}, expected an object")
        action = "rank" if ranking_file else row.get("action")
        annotator, item = row.get("annotator"), row.get("item")
        # Rows without an annotator and item (pairs or rankings from elsewhere) are kept but decide nothing.
        if isinstance(annotator, str) and isinstance(item, str) and action in ACTIONS:
            self._decided.setdefault((annotator, item), Decision(action, row.get("time")))
        return True

    def decisions(self, annotator: str) -> dict[str, Decision]:
        """``item id -> decision`` of one annotator, including what other processes wrote."""
        with self._locked():
            return {item: d for (who, item), d in self._decided.items() if who == annotator}

    def all_decisions(self) -> dict[tuple[str, str], Decision]:
        with self._locked():
            return dict(self._decided)

    # -- writing -----------------------------------------------------------------------------------

    def append(self, row: dict[str, Any]) -> None:
        """Append one decision row (``row["action"]`` says which file) and fsync it; a
        :class:`DuplicateDecision` (nothing written) if its annotator already decided its item."""
        action = row.get("action")
        if action not in ACTIONS or not isinstance(row.get("annotator"), str) or not isinstance(row.get("item"), str):
            raise ValueError(f"a decision row needs 'action' in {ACTIONS}, 'annotator' and 'item'; got {sorted(row)}")
        key = (row["annotator"], row["item"])
        line = dict(row)
        if action == "rank":
            del line["action"]  # the ranking file holds rankings only
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        with self._locked():
            earlier = self._decided.get(key)
            if earlier is not None:
                raise DuplicateDecision(f"annotator {key[0]!r} already {_past(earlier.action)} item {key[1]!r}"
                                        f"{f' at {earlier.time}' if earlier.time else ''}; nothing written")
            log = self._logs["rank" if action == "rank" else "unranked"]
            log.append(data)
            log.read_upto += len(data)
            log.lines += 1
            self._decided[key] = Decision(action, row.get("time"))


def _past(action: str) -> str:
    return {"rank": "ranked", "skip": "skipped", "flag": "flagged"}[action]
