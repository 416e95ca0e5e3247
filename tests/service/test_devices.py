"""One worker per GPU: GPU counting without CUDA, the master's slot bookkeeping (through gunicorn.conf.py's
own hooks, driven like gunicorn's arbiter drives them), and each worker's device."""
from __future__ import annotations

import itertools
import os
import runpy
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from service.devices import (
    SLOT_ATTR, SLOT_ENV, assign_slot, visible_gpu_count, worker_count, worker_device, worker_slot,
)

ROOT = Path(__file__).resolve().parents[2]
NVIDIA_SMI_LISTING = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c-0000-0000-0000-000000000000)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c-0000-0000-0000-000000000001)
  MIG 3g.40gb     Device  0: (UUID: MIG-9a8b7c6d-0000-0000-0000-000000000000)
GPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-0f1e2d3c-0000-0000-0000-000000000002)
"""


@pytest.mark.parametrize("visible, count", [
    ("0,1", 2), ("3", 1), ("", 0), ("-1", 0), ("0,-1,2", 1),  # CUDA stops at the first invalid entry
    ("GPU-0f1e2d3c-aaaa,GPU-0f1e2d3c-bbbb", 2), ("MIG-9a8b7c6d-0000", 1),
])
def test_cuda_visible_devices_is_what_cuda_will_show(visible, count):
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": visible}) == count


def fake_nvidia_smi(directory: Path, listing: str, exit_code: int = 0) -> None:
    script = directory / "nvidia-smi"
    # Only shell builtins: PATH holds nothing but this directory.
    script.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_without_cuda_visible_devices_nvidia_smi_counts_gpus_not_mig_instances(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, NVIDIA_SMI_LISTING)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpu_count({}) == 3


def test_a_failing_nvidia_smi_or_none_at_all_means_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpu_count({}) == 0
    fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed because it could not communicate with the driver\n", 9)
    assert visible_gpu_count({}) == 0


@pytest.mark.parametrize("device, gpus, workers", [
    ("cuda", 4, 4), ("auto", 4, 4), ("", 2, 2), ("auto", 0, 1), ("cuda", 0, 1),
    ("cpu", 4, 1), ("mps", 0, 1), ("cuda:2", 4, 1),
])
def test_one_worker_per_visible_gpu_for_cuda_and_auto_else_one(device, gpus, workers):
    assert worker_count(device, gpu_count=lambda: gpus) == workers


@dataclass
class FakeWorker:
    pid: int


@dataclass
class FakeArbiter:
    """Drives gunicorn.conf.py's pre_fork as gunicorn's Arbiter does: WORKERS holds the live workers."""

    num_workers: int
    WORKERS: dict = field(default_factory=dict)
    pids: itertools.count = field(default_factory=lambda: itertools.count(100))

    def __post_init__(self):
        self.hooks = runpy.run_path(str(ROOT / "gunicorn.conf.py"))

    def spawn(self) -> FakeWorker:
        worker = FakeWorker(next(self.pids))
        self.hooks["pre_fork"](self, worker)
        self.WORKERS[worker.pid] = worker
        return worker

    def slots(self) -> list[int]:
        return sorted(getattr(w, SLOT_ATTR) for w in self.WORKERS.values())

    def worker_in(self, slot: int) -> FakeWorker:
        return next(w for w in self.WORKERS.values() if getattr(w, SLOT_ATTR) == slot)


def test_each_worker_gets_its_own_slot_and_a_replacement_gets_the_dead_ones():
    arbiter = FakeArbiter(num_workers=4)
    for _ in range(4):
        arbiter.spawn()
    assert arbiter.slots() == [0, 1, 2, 3]
    for dead_slot in (2, 0, 3):
        del arbiter.WORKERS[arbiter.worker_in(dead_slot).pid]
        assert getattr(arbiter.spawn(), SLOT_ATTR) == dead_slot
        assert arbiter.slots() == [0, 1, 2, 3]
    # Two die at once: the replacements fill the lowest free slots first.
    for dead_slot in (3, 1):
        del arbiter.WORKERS[arbiter.worker_in(dead_slot).pid]
    assert [getattr(arbiter.spawn(), SLOT_ATTR) for _ in range(2)] == [1, 3]


def test_a_reload_gives_the_new_workers_every_slot_once_before_the_old_ones_go():
    arbiter = FakeArbiter(num_workers=3)
    old = [arbiter.spawn() for _ in range(3)]
    new = [arbiter.spawn() for _ in range(3)]  # SIGHUP: all new workers start first
    assert sorted(getattr(w, SLOT_ATTR) for w in new) == [0, 1, 2]
    for worker in old:
        del arbiter.WORKERS[worker.pid]
    assert arbiter.slots() == [0, 1, 2]


def test_slots_only_come_from_the_configured_worker_count():
    live = [FakeWorker(1), FakeWorker(2)]
    setattr(live[0], SLOT_ATTR, 0)
    setattr(live[1], SLOT_ATTR, 5)  # a slot left over from before the count was lowered (TTOU)
    assert assign_slot(live, 2) == 1
    assert assign_slot([], 0) == 0


def test_post_fork_exports_the_slot_for_the_app(monkeypatch):
    monkeypatch.delenv(SLOT_ENV, raising=False)
    arbiter = FakeArbiter(num_workers=2)
    arbiter.log = type("Log", (), {"info": lambda *args: None})()
    arbiter.spawn()
    worker = arbiter.spawn()
    arbiter.hooks["post_fork"](arbiter, worker)
    assert os.environ[SLOT_ENV] == "1" and worker_slot() == 1


@pytest.mark.parametrize("device, slot, cuda_devices, expected", [
    ("cuda", 0, 2, "cuda:0"), ("cuda", 1, 2, "cuda:1"), ("auto", 1, 2, "cuda:1"),
    ("cuda", 3, 2, "cuda:1"),  # more workers than GPUs (-w raised by hand): wraps around
    ("auto", 1, 0, "cpu"), ("cuda", 0, 0, "cuda"),
    ("cpu", 1, 2, "cpu"), ("cuda:1", 0, 2, "cuda:1"), ("mps", 1, 0, "mps"),
])
def test_each_worker_serves_the_device_of_its_slot(device, slot, cuda_devices, expected):
    assert worker_device(device, slot=slot, cuda_count=lambda: cuda_devices) == expected


def test_the_slot_comes_from_the_environment_and_defaults_to_the_first_device(monkeypatch):
    monkeypatch.setenv(SLOT_ENV, "2")
    assert worker_device("cuda", cuda_count=lambda: 4) == "cuda:2"
    monkeypatch.delenv(SLOT_ENV)
    assert worker_device("cuda", cuda_count=lambda: 4) == "cuda:0"
    assert worker_slot({SLOT_ENV: "nonsense"}) == 0


def test_torch_on_this_machine_decides_auto():
    import torch

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert worker_device("auto", slot=0) == expected
