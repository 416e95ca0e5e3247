"""The CPUs the engine sizes torch for: affinity, capped by a container's CFS quota (cgroup v1 or v2)."""
from __future__ import annotations

import os

import pytest

from models.cpus import LoadAwareThreads, cgroup_cpu_limit, usable_cpus


def write(root, name, text):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


@pytest.mark.parametrize("cpu_max, limit", [
    ("max 100000", None),          # no quota
    ("200000 100000", 2),          # docker run --cpus 2
    ("150000 100000", 2),          # --cpus 1.5: rounds up, a thread per started CPU
    ("50000 100000", 1),           # --cpus 0.5: never below one
    ("garbage", None),
])
def test_cgroup_v2_quota(tmp_path, cpu_max, limit):
    write(tmp_path, "cpu.max", cpu_max)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_cgroup_v1_quota(tmp_path):
    write(tmp_path, "cpu/cpu.cfs_quota_us", "300000")
    write(tmp_path, "cpu/cpu.cfs_period_us", "100000")
    assert cgroup_cpu_limit(tmp_path) == 3
    write(tmp_path, "cpu/cpu.cfs_quota_us", "-1")  # unlimited
    assert cgroup_cpu_limit(tmp_path) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity
    write(tmp_path, "cpu.max", "100000 100000")
    assert usable_cpus(tmp_path) == 1
    write(tmp_path, "cpu.max", f"{(affinity + 8) * 100000} 100000")  # a quota above the affinity
    assert usable_cpus(tmp_path) == affinity


def test_load_aware_threads_switch_with_hysteresis():
    policy = LoadAwareThreads(idle=2, busy=1, few=4, many=8)
    assert [policy.threads_for(rows) for rows in (1, 4, 6, 7, 8, 7, 5, 4, 6)] == [2, 2, 2, 2, 1, 1, 1, 2, 2]
    assert LoadAwareThreads(idle=2, busy=1).threads_for(6) == 1  # between the marks at first: busy
