"""The collective watchdog: a rank that stops answering ends the job on every live rank, with one line that
names it and the collective that waited.

Why torch's own timeout is not enough. A rank that is stopped rather than dead (SIGSTOP, a frozen node, a
debugger, a kernel stuck in I/O) keeps its sockets open, so nothing tells its peers: they wait inside a
collective until that collective's timeout. :func:`~llmsys.distributed.env.init_distributed` gives every
process group the configured timeout (DeepSpeed's own groups included), but when gloo gives up it names
neither the peer nor the collective ("Timed out waiting 60000ms for recv operation to complete"), and what
reaches the user is a traceback.

How it works. On several ranks ``init_distributed`` starts a :class:`Watchdog` on each, two daemon threads:

- **heartbeat**: every ``HEARTBEAT_S`` one thread adds 1 to ``llmsys/watchdog/<rank>`` in the rendezvous
  store, over a client connection of its own, and reads the peers' counters when asked. Only this thread
  touches the store: the store's server may live in the stuck process (rank 0 under the deepspeed launcher),
  and a TCPStore client then waits forever for its answer;
- **watch**: every ``POLL_S`` the other looks at the main thread's innermost Python frame
  (``sys._current_frames``: nothing is added to the step path). A frame in ``torch.distributed`` (a
  blocking collective) or a DeepSpeed ``wait`` on an asynchronous one that is still the same call, at the
  same instruction, after ``timeout`` means some peer is not taking part. Halfway there the watch asks for
  the peers' counters, at the timeout again: the peers whose counters did not move are the ones not
  responding; no answer within ``STORE_TIMEOUT_S`` points at the process that hosts the store;
- **exit**: the watch prints one line to stderr (this rank, the collective and its caller, who is not
  responding) and leaves with ``os._exit(EXIT_HUNG)``: nothing else can run while the main thread waits.
  The launcher (torchrun, deepspeed) then ends the other processes, the stopped one included.

torch's timers are set a little later than the watchdog's (``BACKSTOP`` in ``env.py``), so they end what the
watchdog cannot see. Limits: a native call that spins while holding the GIL (DeepSpeed's CPU shared-memory
op waiting in ``initialize`` for a peer's buffer) stops both threads too; on GPUs NCCL collectives are
asynchronous and a hang surfaces at the next synchronisation, outside ``torch.distributed``, where torch's
NCCL watchdog ends the process (``BACKSTOP`` after the configured timeout).
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from datetime import timedelta
from types import FrameType
from typing import Optional, Protocol

EXIT_HUNG = 4  # the exit status of a rank that gave up waiting on a peer
POLL_S = 1.0  # how often the main thread's stack is looked at
HEARTBEAT_S = 10.0  # at most this long between two heartbeats (timeout / 6 when that is shorter)
STORE_TIMEOUT_S = 5.0  # how long the watch waits for the peers' counters (and env.py to connect)
_KEY = "llmsys/watchdog/{}"
_SEP = os.sep
# Frames that only carry a call towards the collective (llmsys's own wrappers included); the caller named in
# the message is the first other.
_PLUMBING = (f"{_SEP}torch{_SEP}", f"{_SEP}deepspeed{_SEP}comm{_SEP}", f"{_SEP}deepspeed{_SEP}utils{_SEP}",
             f"{_SEP}llmsys{_SEP}distributed{_SEP}env.py", f"{_SEP}typing_extensions.py", f"{_SEP}contextlib.py")
Counts = dict[int, int]


class CounterStore(Protocol):
    """What the watchdog needs of a c10d store (``torch.distributed.TCPStore``)."""

    def add(self, key: str, amount: int) -> int: ...


def _in_torch_distributed(frame: FrameType) -> bool:
    return f"{_SEP}torch{_SEP}distributed{_SEP}" in frame.f_code.co_filename


def waiting_frame(thread_id: int) -> Optional[FrameType]:
    """The innermost frame of thread ``thread_id`` if it is waiting on a collective (a call in
    ``torch.distributed``, or a DeepSpeed ``wait`` on an asynchronous one), else None."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return None
    code = frame.f_code
    if _in_torch_distributed(frame) or (code.co_name == "wait" and f"{_SEP}deepspeed{_SEP}" in code.co_filename):
        return frame
    return None


def _where(frame: FrameType) -> str:
    path = frame.f_code.co_filename
    for root in ("site-packages", "dist-packages"):
        if f"{_SEP}{root}{_SEP}" in path:
            path = path.split(f"{_SEP}{root}{_SEP}", 1)[1]
            break
    else:
        path = os.path.relpath(path) if path.startswith(os.getcwd() + _SEP) else path
    qualname = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    return f"{path}:{frame.f_lineno} in {qualname}"


def describe_collective(frame: FrameType) -> str:
    """``all_reduce (called from deepspeed/runtime/zero/stage_1_and_2.py:2384 in ...allreduce_bucket)``: the
    outermost ``torch.distributed`` function on the stack (or the DeepSpeed ``wait``) and its first caller
    outside torch and DeepSpeed's comm layer."""
    name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    caller = frame.f_back
    while caller is not None and any(p in caller.f_code.co_filename for p in _PLUMBING):
        if _in_torch_distributed(caller) and caller.f_code.co_name != "wrapper":
            name = caller.f_code.co_name
        caller = caller.f_back
    return f"{name} (called from {_where(caller)})" if caller is not None else name


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:8]) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


class _Heartbeat:
    """The one thread that talks to the store: beats every ``interval_s``, reads the peers' counters on
    request (the answer goes to the queue in the request; None when the store failed)."""

    def __init__(self, store: CounterStore, rank: int, world_size: int, interval_s: float):
        self.store, self.rank, self.world_size, self.interval_s = store, rank, world_size, interval_s
        self.requests: queue.Queue[Optional[queue.Queue[Optional[Counts]]]] = queue.Queue()  # None: stop
        self.thread = threading.Thread(target=self._run, name="llmsys-heartbeat", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                self.store.add(_KEY.format(self.rank), 1)
            except RuntimeError:  # DistStoreError, DistNetworkError: no store now; try again next time
                pass
            try:
                reply = self.requests.get(timeout=self.interval_s)
            except queue.Empty:
                continue
            if reply is None:
                return
            try:
                reply.put({r: self.store.add(_KEY.format(r), 0) for r in range(self.world_size) if r != self.rank})
            except RuntimeError:
                reply.put(None)

    def read(self) -> Optional[Counts]:
        """Every other rank's heartbeat count, or None if the store did not answer in ``STORE_TIMEOUT_S``."""
        reply: queue.Queue[Optional[Counts]] = queue.Queue(maxsize=1)
        self.requests.put(reply)
        try:
            return reply.get(timeout=STORE_TIMEOUT_S)
        except queue.Empty:
            return None


class Watchdog:
    """One rank's heartbeat and collective watch (see the module docstring): ``start()`` runs them in daemon
    threads, ``stop()`` ends them."""

    def __init__(self, *, rank: int, world_size: int, timeout: timedelta, setting: str, store: CounterStore,
                 store_owner: str):
        """``setting`` names the timeout for the message (``deepspeed.timeout_minutes=1``); ``store`` holds
        the heartbeats and ``store_owner`` names the process that hosts it (``rank 0``, ``the torchrun agent
        at HOST:PORT``)."""
        self.rank, self.setting, self.store_owner = rank, setting, store_owner
        self.timeout_s = timeout.total_seconds()
        self.heartbeat = _Heartbeat(store, rank, world_size, min(HEARTBEAT_S, self.timeout_s / 6))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="llmsys-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.heartbeat.thread.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the watch; the heartbeat thread ends after its current store call (never waited for: that
        call may be to a store that no longer answers)."""
        self._stop.set()
        self._thread.join()
        self.heartbeat.requests.put(None)

    def _watch(self) -> None:
        main = threading.main_thread().ident
        watched, lasti, since = None, -1, 0.0
        probed_at, before = None, None  # the first reading of the peers' counters during this wait
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            frame = waiting_frame(main)
            if frame is None or frame is not watched or frame.f_lasti != lasti:
                # A new wait (or none): count from here, holding no frame that has moved on.
                watched, lasti, since = frame, frame.f_lasti if frame is not None else -1, now
                probed_at = before = None
            elif probed_at is None and now - since >= self.timeout_s / 2:
                probed_at, before = now, self.heartbeat.read()
            elif probed_at is not None and now - since >= self.timeout_s and now - probed_at >= self.timeout_s / 2:
                self._abort(watched, now - since, before, now - probed_at)
            frame = None

    def _not_responding(self, before: Optional[Counts], quiet_s: float) -> str:
        """Who is not responding: the peers whose counters did not move in the last ``quiet_s``."""
        after = self.heartbeat.read() if before is not None else None
        if before is None or after is None:
            return f"the heartbeat store does not answer: {self.store_owner}, which hosts it, is not responding"
        silent = [r for r in sorted(after) if after[r] == before[r]]
        if not silent:
            return ("every other rank's heartbeat is alive: one of them is busy outside this collective or "
                    "waiting in another one")
        return f"{_ranks(silent)} not responding (no heartbeat in the last {quiet_s:.0f} s)"

    def _abort(self, frame: FrameType, waited_s: float, before: Optional[Counts], quiet_s: float) -> None:
        line = (f"llmsys: rank {self.rank} waited {waited_s:.0f} s in {describe_collective(frame)}, the limit "
                f"{self.setting}; {self._not_responding(before, quiet_s)}; ending the job (exit {EXIT_HUNG})")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        os._exit(EXIT_HUNG)
