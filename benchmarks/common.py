"""What the benchmarks share: timing a command with the peak memory of its whole process tree."""

from __future__ import annotations

import subprocess
import threading
import time

import psutil


class TreeMemory:
    """Peak summed RSS of a process and all its descendants (Ray workers included), sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def timed(cmd: list[str]) -> tuple[float, float, str]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = TreeMemory(proc.pid)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    peak = memory.stop()
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed with exit code {proc.returncode}")
    return seconds, peak, out
