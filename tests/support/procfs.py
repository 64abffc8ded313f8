"""What Linux's /proc says about a process tree and the machine: memory, CPU time, stolen time."""

from __future__ import annotations

import os
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """The process and its children."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    return pids


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children so far (Linux /proc)."""
    ticks = 0
    for each in process_tree(pid):
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_steal() -> tuple[int, int]:
    """CPU time stolen by the hypervisor, and all CPU time, in ticks since boot (Linux /proc/stat)."""
    counters = [int(n) for n in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return counters[7], sum(counters)


def process_tree_memory_mb(pid: int, proportional: bool = True) -> dict[str, float]:
    """Resident and peak resident memory of a process and its children, summed (Linux /proc); and, unless told
    not to (it walks every page table: slow for a large index), their proportional share (PSS). With several
    worker processes the resident sets count the pages they share (the libraries, the memory-mapped index) once
    per process, the proportional sets once in all."""
    pids = process_tree(pid)
    rss = hwm = pss = 0.0
    for each in pids:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{each}/status").read_text().splitlines())
        rss += int(status["VmRSS"].split()[0]) / 1024
        hwm += int(status["VmHWM"].split()[0]) / 1024
        if proportional:
            rollup = Path(f"/proc/{each}/smaps_rollup").read_text()
            pss += int(rollup.split("\nPss:", 1)[1].split()[0]) / 1024
    memory = {"processes": len(pids), "rss_mb": round(rss, 1), "peak_rss_mb": round(hwm, 1)}
    return {**memory, "pss_mb": round(pss, 1)} if proportional else memory
