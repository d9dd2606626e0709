"""SM clock and board power of one GPU while a benchmark runs, sampled by nvidia-smi every 100 ms.

A step time means little without them: an H100 SXM at its 700 W cap lowers its SM clock (1980 MHz
max) to what the power allows, so a kernel change timed in a short window, at a high clock, can gain
less or nothing in a long run at the cap (bench/RESULTS.md, session 16).

    with PowerSampler(torch.cuda.current_device()) as p:
        ...timed runs...
    p.summary()  # {"sm_mhz": median, "watts": mean, "limit_w": the board's power limit, "samples": n}
"""
from __future__ import annotations

import datetime
import shutil
import statistics
import subprocess
import tempfile
import time

FIELDS = "timestamp,clocks.sm,power.draw,power.limit"


def _gpu_id(index: int) -> str:
    """nvidia-smi's id of torch's device `index` (its UUID: CUDA_VISIBLE_DEVICES may renumber)."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"GPU-{uuid}" if uuid is not None else str(index)


def parse(lines, start: float = float("-inf"), end: float = float("inf")) -> dict:
    """Summary of nvidia-smi csv lines `timestamp, clock, watts, limit` (noheader, nounits) taken
    between `start` and `end` (time.time()). The power-cap bit of the clock event reasons is no use
    here: it was set in 90% of the samples of a 1.3B step whose median clock was 1965 MHz."""
    clocks, watts, limits = [], [], []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time
            clock, power, limit = int(float(parts[1])), float(parts[2]), float(parts[3])
        except ValueError:  # "[N/A]", a torn line
            continue
        if not start <= when <= end:  # the idle GPU before and after the timed work
            continue
        clocks.append(clock)
        watts.append(power)
        limits.append(limit)
    if not clocks:
        return {"samples": 0}
    return dict(sm_mhz=int(statistics.median(clocks)), watts=round(statistics.fmean(watts)), limit_w=round(max(limits)),
                samples=len(clocks))


class PowerSampler:
    def __init__(self, index: int = 0, period_ms: int = 100):
        self.index, self.period_ms = index, period_ms
        self.proc = self.file = None
        self.start = 0.0
        self.result = {"samples": 0}

    def __enter__(self):
        tool = shutil.which("nvidia-smi")
        if tool is None:
            return self
        self.file = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([tool, "-i", _gpu_id(self.index), f"--query-gpu={FIELDS}",
                                      "--format=csv,noheader,nounits", f"-lms={self.period_ms}"],
                                     stdout=self.file, stderr=subprocess.DEVNULL)
        time.sleep(0.2)  # nvidia-smi up before the timed work starts
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            end = time.time()
            time.sleep(0.15)  # the last sample of the timed work
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.file.seek(0)
            self.result = parse(self.file.read().splitlines(), self.start, end)
            self.file.close()
            self.proc = self.file = None
        return False

    def summary(self) -> dict:
        return self.result
