"""The bench's worker processes: started together, asked one JSON line at a time, never left behind."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import compress
from compress.errors import BenchError

WORKER_COMMAND = (sys.executable, "-m", "compress.eval.worker")
STDERR_TAIL = 3000  # characters of a failed worker's stderr put in the error
EXIT_GRACE_S = 5  # a worker asked to exit gets this long before it is killed


class WorkerProcess:
    """One `compress.eval.worker` process. Every reply must come within `timeout_s`, or the worker is killed."""

    def __init__(self, name: str, threads: int, timeout_s: float, stderr_path: Path) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.stderr_path = stderr_path
        self.pending = b""  # bytes read past the end of the last reply
        # stderr goes to a file: a pipe nobody drains would block a chatty worker.
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(list(WORKER_COMMAND), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, env=_worker_env(threads))

    def request(self, request: dict) -> dict:
        self.send(request)
        return self.receive()

    def send(self, request: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self._failure() from None

    def receive(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        stdout = self.process.stdout.fileno()
        while b"\n" not in self.pending:
            ready, _, _ = select.select([stdout], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                self.stop(graceful=False)
                raise BenchError(f"bench worker for {self.name!r} did not answer within {self.timeout_s:g} s "
                                 "(bench.timeout_s); stopped it")
            chunk = os.read(stdout, 1 << 16)
            if not chunk:
                raise self._failure()
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return json.loads(line)

    def stop(self, graceful: bool) -> None:
        """Ends the process: asked to exit first when `graceful`, killed when it does not."""
        if graceful and self.process.poll() is None:
            try:
                self.send({"op": "exit"})
            except BenchError:
                pass  # it ended on its own
        self._end(EXIT_GRACE_S if graceful else 0)
        with suppress(BrokenPipeError):  # a request the worker never read may still sit in the buffer
            self.process.stdin.close()
        self.process.stdout.close()

    def _failure(self) -> BenchError:
        self._end(EXIT_GRACE_S)
        tail = self.stderr_path.read_text(errors="replace")[-STDERR_TAIL:]
        return BenchError(f"bench worker for {self.name!r} failed (exit {self.process.returncode}):\n{tail}")

    def _end(self, grace_s: float) -> None:
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def started_workers(names: list[str], threads: int, timeout_s: float,
                    scratch: Path) -> Iterator[dict[str, WorkerProcess]]:
    """A worker per name; all of them are stopped when the block ends, killed when it ends by an error."""
    workers: dict[str, WorkerProcess] = {}
    graceful = False
    try:
        for index, name in enumerate(names):
            stem = re.sub(r"[^\w.-]", "_", name)
            workers[name] = WorkerProcess(name, threads, timeout_s, scratch / f"{index}-{stem}.stderr")
        yield workers
        graceful = True
    finally:
        for worker in workers.values():
            worker.stop(graceful)


def _worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # The worker must import this same checkout of compress, wherever the caller's working directory is.
    package_root = str(Path(compress.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env
