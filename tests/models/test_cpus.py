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


def run_steps(policy, rows, steps, seconds_for):
    """``steps`` steps of ``rows`` rows, each taking ``seconds_for(threads)``. -> the threads each used."""
    used = []
    for _ in range(steps):
        threads = policy.threads_for(rows)
        policy.record(rows, threads, seconds_for(threads))
        used.append(threads)
    return used


def test_threads_start_from_the_load_then_keep_what_measures_faster():
    policy = LoadAwareThreads(idle=2, busy=1, few=4, probe_steps=3, first_probe=5)
    assert policy.threads_for(1) == 2 and policy.threads_for(40) == 1  # every core for few streams only
    assert policy.prefill_threads(0) == 2
    # Free cores: two threads are faster at batch 32 too; after its first try the bucket keeps them
    # (a later try of one thread loses and changes nothing).
    used = run_steps(policy, 32, 20, {1: 0.10, 2: 0.06}.get)
    assert used == [1] * 5 + [2] * 3 + [2] * 5 + [1] * 3 + [2] * 4


def test_a_losing_try_goes_back_and_waits_four_times_as_long_before_the_next():
    policy = LoadAwareThreads(idle=2, busy=1, probe_steps=3, first_probe=5)
    # A busy machine: two OpenMP threads wait for each other, three times slower.
    used = run_steps(policy, 1, 40, {1: 0.02, 2: 0.06}.get)
    assert used == [2] * 5 + [1] * 3 + [1] * 5 + [2] * 3 + [1] * 20 + [2] * 3 + [1] * 1
    assert policy.threads_for(40) == 1  # a new range starts from what batch 1 found
    # Ten times slower: a try ends at its first step.
    policy = LoadAwareThreads(idle=2, busy=1, probe_steps=3, first_probe=5)
    used = run_steps(policy, 1, 40, {1: 0.02, 2: 0.2}.get)
    assert used == [2] * 5 + [1] * 3 + [1] * 5 + [2] + [1] * 20 + [2] + [1] * 5
    assert policy.prefill_threads(0) == 1  # a burst into an idle runner goes by batch 1's finding
