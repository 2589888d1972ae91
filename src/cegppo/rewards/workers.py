"""Worker processes that score responses with a per-response wall-clock timeout.

Why processes: a reward stuck in sympy (or in C code) cannot be interrupted from another thread, and
math-verify's own timeout uses ``signal.alarm``, which works only in a main thread. A worker process can always be
killed.

Protocol (one duplex pipe per worker): the parent sends a chunk of items and the worker answers each item as soon
as it is scored, so the parent sees per-item progress. Each item's deadline is ``timeout_s`` after the worker's
previous answer (or after the chunk was sent). When a deadline passes, only the item in progress is marked as
timed out; the worker is killed, a fresh one is started, and the rest of its chunk goes back to the queue. Chunks
are about a quarter of each worker's share, so that idle workers pick up the remainder of a slow one.

Workers are fresh interpreters (``python -c``), not ``multiprocessing`` processes: ``spawn`` and ``forkserver``
re-run the caller's main script in every worker (which fails in a script without an ``if __name__ ==
"__main__"`` guard, and re-imports torch in one that has it), and ``fork`` would copy locks held by the trainer's
threads into the child. A worker costs about 0.5-1 s to start (mostly importing math-verify and sympy); that
happens in the background at construction, and again only after a timeout or crash. Workers exit when the pipe
closes, and a watchdog thread ends them if the parent process dies. POSIX only (the pipe is passed by fd).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from typing import Any

from cegppo.rewards.config import RewardConfig
from cegppo.rewards.functions import call_reward, resolve_reward_function

# (index, data_source, response, ground_truth, extra_info)
Item = tuple[int, str, str, str, Any]
# ("ok", index, score, correct, extras) | ("error", index, message) | ("timeout", index, message)
Answer = tuple

STARTUP_TIMEOUT_S = 120.0

# argv: fd of the pipe, parent pid, the parent's sys.path as JSON.
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[3]); "
    "from cegppo.rewards.workers import worker_main; worker_main(int(sys.argv[1]), int(sys.argv[2]))"
)


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns that its own timeout is off; in a worker the parent enforces one, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def worker_main(fd: int, parent_pid: int) -> None:
    """Entry point of a worker process: receive the config, then answer chunks of items until told to stop."""
    # Ctrl-C reaches the whole process group; the parent handles it and kills the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    conn = Connection(fd)
    try:
        cfg: RewardConfig = conn.recv()
        fn = resolve_reward_function(cfg)
        if cfg.name == "math":
            fn(data_source="", solution_str="\\boxed{1}", ground_truth="1")  # the first parse costs 15-45 ms
    except BaseException as exc:
        conn.send(("init_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            chunk = conn.recv()
        except EOFError:
            return
        if chunk is None:
            return
        for index, data_source, response, ground_truth, extra_info in chunk:
            try:
                outcome = call_reward(fn, cfg, data_source, response, ground_truth, extra_info)
                answer: Answer = ("ok", index, outcome.score, outcome.correct, outcome.extras)
            except BaseException as exc:  # math-verify's TimeoutException and SystemExit are BaseExceptions
                answer = ("error", index, f"{type(exc).__name__}: {exc}")
            try:
                conn.send(answer)
            except Exception as exc:  # e.g. unpicklable extras in a returned dict
                conn.send(("error", index, f"the reward's result could not be sent back: {exc}"))


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    started: float
    ready: bool = False
    inflight: deque = field(default_factory=deque)
    deadline: float = math.inf


def _stop(workers: list[_Worker | None]) -> None:
    for w in workers:
        if w is not None and w.ready and not w.inflight:
            with contextlib.suppress(OSError):
                w.conn.send(None)
    for i, w in enumerate(workers):
        if w is None:
            continue
        try:
            w.process.wait(timeout=1.0 if w.ready and not w.inflight else 0.0)
        except subprocess.TimeoutExpired:
            w.process.kill()
            w.process.wait()
        w.conn.close()
        workers[i] = None


class WorkerPool:
    """``num_workers`` processes running the reward of ``cfg``; see the module docstring for the protocol."""

    def __init__(self, cfg: RewardConfig, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._cfg = cfg
        self._workers: list[_Worker | None] = [None] * num_workers
        self._finalizer = weakref.finalize(self, _stop, self._workers)
        self._ensure_started()

    def _start(self, slot: int) -> None:
        parent_conn, child_conn = Pipe(duplex=True)
        fd = child_conn.fileno()
        process = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(fd), str(os.getpid()), json.dumps(sys.path)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
        )
        child_conn.close()
        parent_conn.send(self._cfg)
        self._workers[slot] = _Worker(process=process, conn=parent_conn, started=time.monotonic())

    def _ensure_started(self) -> None:
        for slot, w in enumerate(self._workers):
            if w is None:
                self._start(slot)

    def _replace(self, slot: int, pending: deque) -> None:
        """Kill the worker in ``slot``, requeue its unanswered items and start a fresh one."""
        w = self._workers[slot]
        assert w is not None
        if w.inflight:
            pending.appendleft(list(w.inflight))
        w.process.kill()
        w.process.wait()
        w.conn.close()
        self._start(slot)

    def close(self) -> None:
        """Stop all workers (idle ones are asked to exit, busy ones are killed)."""
        self._finalizer()

    def run(self, items: list[Item], timeout_s: float) -> dict[int, Answer]:
        """Score ``items``; the answer for each index is ok, error or timeout. Raises RuntimeError only if a
        worker cannot start (the reward could not be loaded in it)."""
        if not self._finalizer.alive:
            raise RuntimeError("the reward worker pool is closed")
        self._ensure_started()
        try:
            return self._run(items, timeout_s)
        except BaseException:
            # Interrupted or failed half-way: workers may still owe answers, so none of them can be reused.
            _stop(self._workers)
            raise

    def _run(self, items: list[Item], timeout_s: float) -> dict[int, Answer]:
        answers: dict[int, Answer] = {}
        chunk_size = max(1, math.ceil(len(items) / (4 * len(self._workers))))
        pending: deque = deque(items[i : i + chunk_size] for i in range(0, len(items), chunk_size))
        while len(answers) < len(items):
            for w in self._workers:
                if w is not None and w.ready and not w.inflight and pending:
                    chunk = pending.popleft()
                    w.inflight.extend(chunk)
                    w.conn.send(chunk)
                    w.deadline = time.monotonic() + timeout_s
            active = {
                w.conn: slot
                for slot, w in enumerate(self._workers)
                if w is not None and (w.inflight or not w.ready)
            }
            deadline = min(self._deadline(slot) for slot in active.values())
            for conn in wait(list(active), timeout=max(0.0, deadline - time.monotonic())):
                self._receive(active[conn], answers, pending, timeout_s)
            now = time.monotonic()
            for slot in active.values():
                w = self._workers[slot]
                assert w is not None
                if self._deadline(slot) > now or w.conn.poll(0):
                    continue
                if not w.ready:
                    raise RuntimeError(f"reward worker did not start within {STARTUP_TIMEOUT_S:.0f} s")
                if w.inflight:
                    index = w.inflight.popleft()[0]
                    answers[index] = ("timeout", index, f"timed out after {timeout_s:g} s")
                    self._replace(slot, pending)
        return answers

    def _deadline(self, slot: int) -> float:
        w = self._workers[slot]
        assert w is not None
        return w.deadline if w.ready else w.started + STARTUP_TIMEOUT_S

    def _receive(self, slot: int, answers: dict[int, Answer], pending: deque, timeout_s: float) -> None:
        """Read every message the worker in ``slot`` has sent so far."""
        w = self._workers[slot]
        assert w is not None
        while True:
            try:
                message = w.conn.recv()
            except (EOFError, OSError):
                code = w.process.wait()
                if not w.ready:
                    raise RuntimeError(f"reward worker exited during start-up (exit code {code})") from None
                index = w.inflight.popleft()[0]
                answers[index] = ("error", index, f"reward worker died (exit code {code}) while scoring")
                self._replace(slot, pending)
                return
            kind = message[0]
            if kind == "ready":
                w.ready = True
            elif kind == "init_error":
                raise RuntimeError(f"reward worker could not load reward {self._cfg.name!r}: {message[1]}")
            else:
                expected = w.inflight.popleft()[0]
                if message[1] != expected:
                    raise RuntimeError(f"reward worker answered item {message[1]}, expected {expected}")
                answers[expected] = message
                w.deadline = time.monotonic() + timeout_s
            if not w.conn.poll(0):
                return
