"""How many CPUs a process may use, and how many threads to give each of its workers.

PyTorch starts one thread per core by default. On a machine shared with other
jobs (a login node, a loaded workstation, a Slurm node without exclusive
cores) its OpenMP threads wait on each other at every parallel region while
the cores they need are busy elsewhere; measured on a loaded 2-core machine,
the default made a small training run tens of times slower than one thread
(docs/observability.md, "Busy machines"). The default chosen here never asks for more
threads than CPUs are free:

    threads = min(CPUs this process may use // processes, idle CPUs // processes)

where "CPUs this process may use" respects the affinity mask (taskset, Slurm
cgroups) and a cgroup CPU quota (containers), and "idle CPUs" is the machine's
CPU count minus its 1-minute load average. An explicit OMP_NUM_THREADS wins:
whoever set it has decided. The count never changes results beyond float
rounding order, and both packages print the figure they chose.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

MAX_THREADS_PER_CPU = 4
_CGROUP_V2_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.5), None when unlimited/unknown."""
    try:
        if _CGROUP_V2_MAX.is_file():
            quota, period = _CGROUP_V2_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if _CGROUP_V1_QUOTA.is_file() and _CGROUP_V1_PERIOD.is_file():
            quota_us = int(_CGROUP_V1_QUOTA.read_text())
            period_us = int(_CGROUP_V1_PERIOD.read_text())
            return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask (Slurm, taskset) capped by a cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(cpus, 1)


def idle_cpus() -> float | None:
    """CPUs of the machine not busy with runnable work (1-minute load), None when unknown."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return max((os.cpu_count() or 1) - load, 0.0)


def _omp_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads(processes: int = 1) -> int:
    """Threads per process so that processes x threads fits the free CPUs (at least 1).

    `processes` counts the busy processes of this job on the machine
    (generate's writer workers, training ranks on one node).
    """
    explicit = _omp_threads()
    if explicit is not None:
        return explicit
    processes = max(processes, 1)
    threads = available_cpus() // processes
    idle = idle_cpus()
    if idle is not None:
        # Round to the nearest CPU: a load of 0.3 left over from a finished job
        # should not take a core away; a load of 1.7 takes two.
        threads = min(threads, int(idle + 0.5) // processes)
    return max(threads, 1)


def describe_threads(threads: int, processes: int = 1) -> str:
    """A short account of a thread choice, for the start-up messages."""
    idle = idle_cpus()
    load = "" if idle is None else f", {idle:.1f} idle"
    per = f" x {processes} processes" if processes > 1 else ""
    return f"{threads} thread{'s' if threads != 1 else ''}{per} ({available_cpus()} CPUs{load})"


def thread_limit() -> int:
    """The most threads a process is given: MAX_THREADS_PER_CPU per CPU it may use.

    More never helps, and OpenMP asked for 100,000 threads exhausts the
    process's stacks and crashes (a segfault, not an error)."""
    return MAX_THREADS_PER_CPU * available_cpus()


def set_torch_threads(threads: int | None, processes: int = 1) -> int:
    """Set torch's intra-op threads (None: :func:`default_threads`); return the count used.

    A count above :func:`thread_limit` (an option or OMP_NUM_THREADS) is capped
    there, with one line on stderr saying so."""
    import torch

    chosen = default_threads(processes) if threads is None else threads
    if chosen < 1:
        raise ValueError(f"threads must be at least 1, got {chosen}")
    limit = thread_limit()
    if chosen > limit:
        print(
            f"note: {chosen:,} threads capped at {limit} ({MAX_THREADS_PER_CPU} per CPU; "
            f"this process may use {available_cpus()})",
            file=sys.stderr,
            flush=True,
        )
        chosen = limit
    torch.set_num_threads(chosen)
    return chosen


def available_memory_bytes() -> int | None:
    """Memory this machine can still give (MemAvailable on Linux), None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
