"""Timing and memory helpers shared by the benchmark scripts (see ../shared/BENCHMARKS.md).

Our CPUs are shared and noisy, so every figure we publish is a ratio of two
implementations measured side by side in one run (interleaved in time), from medians over
repetitions after warm-up. CUDA timings use events with the L2 cache flushed between repetitions.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def _call_seconds(fn: Callable[[], object], device: torch.device, flush: torch.Tensor | None) -> float:
    """Wall time of one fn() in seconds; on CUDA by events, with the L2 cache flushed first."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    flush.zero_()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3


def time_side_by_side(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                      warmup: int = 1, warmup_s: float = 1.0,
                      min_time_s: float = 2.0) -> dict[str, float]:
    """Median wall time in seconds of each of `fns`, timed side by side: in rounds, each fn
    in turn runs for as long as the slowest call of the previous round took (at least once),
    until every fn has `repeats` calls and the rounds have lasted `min_time_s`; all after
    `warmup` calls and `warmup_s` seconds of calls of each.

    Our VMs have slow spells of a few tenths of a second to several seconds (case A's
    compiled MSDA forward, 60 calls in a row: ~48 ms, with runs of 100-140 ms). Timed one
    after the other, a spell could fall on one side of a ratio only (that forward measured
    76 ms in one run, 41-47 in the others); side by side, in equal spans, both sides see the
    machine in the same states. And the first calls of a process ran up to 2x slower
    (~150 ms for that forward's first five calls), hence the warm-up by time."""
    flush = torch.empty(64 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None
    for fn in fns.values():
        start, done = time.perf_counter(), 0
        while done < warmup or time.perf_counter() - start < warmup_s:
            fn()
            done += 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    span, start = 0.0, time.perf_counter()
    while min(map(len, times.values())) < repeats or time.perf_counter() - start < min_time_s:
        longest = 0.0
        for name, fn in fns.items():
            begin = time.perf_counter()
            while True:
                times[name].append(_call_seconds(fn, device, flush))
                longest = max(longest, times[name][-1])
                if time.perf_counter() - begin >= span:
                    break
        span = longest
    return {name: statistics.median(t) for name, t in times.items()}


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1,
            warmup_s: float = 1.0, min_time_s: float = 2.0) -> float:
    """Median wall time of fn() in seconds: time_side_by_side of fn alone."""
    return time_side_by_side({"fn": fn}, device, repeats, warmup, warmup_s, min_time_s)["fn"]


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> None:
    """Resets the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since the last reset_peak_rss(), in MiB."""
    return _status_mib("VmHWM")


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of fn() above what was in use when it started, in MiB: the caching
    allocator's statistics on CUDA, the process's resident set (VmHWM after a reset) on the
    CPU. Call it in a fresh process (measure_in_subprocess)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20 - base
    reset_peak_rss()
    base = rss_mib()
    fn()
    return peak_rss_mib() - base


def measure_in_subprocess(script: str, args: list[str]) -> dict:
    """Runs `python script --probe ...args` in a fresh process and returns the JSON line it
    prints (a probe uses peak_memory_mib). glibc is told to serve every allocation above 64 KiB with mmap,
    so that freed tensors leave the resident set at once and RSS tracks live memory."""
    out = subprocess.run(
        [sys.executable, script, "--probe", *args], check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def environment() -> dict:
    import codetr

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "codetr_ops": codetr.ops.extension_info()["ops"],
    }


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
