"""Thread defaults that do not oversubscribe a shared machine."""

from __future__ import annotations

import os

import pytest

from gssm_data.common import resources


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """A fake machine: `set(cpus=, affinity=, load=, quota=)`; no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def configure(*, cpus: int, affinity: int, load: float, quota: float | None = None) -> None:
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(resources, "cgroup_cpu_limit", lambda: quota)

    return configure


def test_an_idle_machine_gets_one_thread_per_cpu_divided_among_processes(machine) -> None:
    machine(cpus=16, affinity=16, load=0.2)
    assert resources.default_threads() == 16
    assert resources.default_threads(processes=4) == 4
    assert resources.default_threads(processes=32) == 1  # never zero


def test_a_busy_machine_gets_only_its_idle_cpus(machine) -> None:
    machine(cpus=2, affinity=2, load=2.4)  # another job holds both cores
    assert resources.default_threads() == 1
    machine(cpus=16, affinity=16, load=9.6)  # 6.4 idle -> 6
    assert resources.default_threads() == 6
    assert resources.default_threads(processes=2) == 3


def test_affinity_and_cgroup_quota_cap_the_count(machine) -> None:
    machine(cpus=64, affinity=8, load=0.0)  # taskset / Slurm cgroup
    assert resources.available_cpus() == 8
    assert resources.default_threads() == 8
    machine(cpus=64, affinity=64, load=0.0, quota=2.5)  # a container limited to 2.5 CPUs
    assert resources.available_cpus() == 3
    assert resources.default_threads(processes=3) == 1


def test_omp_num_threads_wins(machine, monkeypatch: pytest.MonkeyPatch) -> None:
    machine(cpus=2, affinity=2, load=5.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resources.default_threads() == 2


def test_the_cgroup_v2_quota_file_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(resources, "_CGROUP_V2_MAX", limit)
    limit.write_text("150000 100000\n")
    assert resources.cgroup_cpu_limit() == 1.5
    limit.write_text("max 100000\n")
    assert resources.cgroup_cpu_limit() is None
