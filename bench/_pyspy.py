"""Optional sampling of the worker with py-spy (`pip install py-spy`, not a dependency).

`Profiler(pid, path)` runs `py-spy record --format raw` (collapsed stacks) on a process for
as long as it is open; `summarize(path)` turns the samples into the top functions by self
and by inclusive time, per thread. Idle samples are included (`--idle`), so a thread's
shares are shares of wall time: time blocked in librdkafka or a lock shows up as such. py-spy costs CPU on a 2-core machine: a profiled run's
throughput is not comparable with an unprofiled one.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, path: Path, rate: int = 100) -> None:
        exe = find_py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy==0.4.3")
        self.path = path
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--threads", "--idle", "--output", str(path), "--nonblocking"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"


# Leaf frames of a thread waiting for work: the executor's queue, the event loop's epoll.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py)", "EpollSelector.select (selectors.py)")


def _group(thread: str) -> str:
    """`thread (123): partition_3` -> `partition_*`; the executor threads are one pool."""
    name = thread.rsplit(": ", 1)[-1] if ": " in thread else thread
    return re.sub(r"_\d+$", "_*", name)


def summarize(path: Path, top: int = 15) -> dict:
    """{thread group: {"samples", "waiting_for_work", "self", "inclusive"}}: shares (%) of the
    group's *working* samples (those not parked waiting for work; time blocked inside
    librdkafka or RocksDB calls counts as working, under the Python frame that called)."""
    groups: dict[str, dict] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith(("thread", "process")):
            thread = frames.pop(0)
        if not frames:
            continue
        g = groups.setdefault(_group(thread), {"samples": 0, "idle": 0, "self": collections.Counter(),
                                               "inclusive": collections.Counter()})
        g["samples"] += n
        leaf = _short(frames[-1])
        if leaf in IDLE_LEAVES:
            g["idle"] += n
            continue
        g["self"][leaf] += n
        for func in {_short(f) for f in frames}:
            g["inclusive"][func] += n
    out = {}
    for name, g in sorted(groups.items(), key=lambda kv: -(kv[1]["samples"] - kv[1]["idle"])):
        busy = g["samples"] - g["idle"]
        out[name] = {
            "samples": g["samples"],
            "waiting_for_work_pct": round(100 * g["idle"] / g["samples"], 1) if g["samples"] else None,
            "self": [(f, round(100 * c / busy, 1)) for f, c in g["self"].most_common(top)] if busy else [],
            "inclusive": [(f, round(100 * c / busy, 1)) for f, c in g["inclusive"].most_common(top)] if busy else [],
        }
    return out


def report(path: Path, log, top: int = 15) -> None:
    for name, g in summarize(path, top).items():
        log(f"py-spy {path.name}: {name}: {g['samples']} samples, "
            f"{g['waiting_for_work_pct']}% parked waiting for work; shares of the rest:")
        for title in ("self", "inclusive"):
            if g[title]:
                log(f"  top {title}:")
                for func, share in g[title]:
                    log(f"    {share:5.1f}%  {func}")
