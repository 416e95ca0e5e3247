"""One gunicorn worker per GPU: how many workers a machine gets, and which device each one serves.

gunicorn numbers no workers, so the master hands each new worker a *slot* before it forks it
(``assign_slot`` from the ``pre_fork`` hook): the lowest slot no live worker holds. A worker that dies is
replaced in its own slot, so worker i always serves ``cuda:i`` and no two workers share a GPU. The worker
learns its slot from ``RIVULET_WORKER_SLOT`` (set by the ``post_fork`` hook, before the app is loaded)
and ``worker_device`` turns ``RIVULET_DEVICE`` into its own device.

No heavy imports: the master calls this before it forks, and must not import torch or touch CUDA.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger("rivulet.service")

# Set by gunicorn.conf.py in each forked worker; not a setting (users never set it).
SLOT_ENV = "RIVULET_WORKER_SLOT"
# Attribute on gunicorn's worker object (created in the master, inherited by the forked child).
SLOT_ATTR = "rivulet_slot"
# RIVULET_DEVICE values that mean "every visible GPU, one worker each" (auto: when there is a GPU).
ALL_GPUS = ("cuda", "auto")
NVIDIA_SMI_TIMEOUT_S = 10.0
# CUDA stops enumerating CUDA_VISIBLE_DEVICES at the first entry that is neither an index nor a UUID.
_VISIBLE_ENTRY = re.compile(r"\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+")


def visible_gpu_count(environ: Mapping[str, str] | None = None,
                      run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """GPUs this process may use, counted without CUDA.

    Not ``torch.cuda.device_count()``: importing torch would cost the master a second and hundreds of MB
    it never uses, and when NVML is missing torch falls back to ``cudaGetDeviceCount``, which initialises
    the driver in the master, after which CUDA fails in every forked worker. So: ``CUDA_VISIBLE_DEVICES``
    when set (what CUDA will expose), else ``nvidia-smi --list-gpus`` (installed with the driver and
    mounted into containers by the NVIDIA container toolkit); no nvidia-smi = no GPU.
    """
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for entry in visible.split(","):
            if not _VISIBLE_ENTRY.fullmatch(entry.strip()):
                break
            count += 1
        return count
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return 0
    try:
        listed = run([nvidia_smi, "--list-gpus"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed (%s): counting no GPU", exc)
        return 0
    if listed.returncode != 0:  # e.g. a driver/library mismatch: CUDA would fail as well
        log.warning("nvidia-smi --list-gpus exited with %s: counting no GPU", listed.returncode)
        return 0
    # "GPU 0: NVIDIA H100 (UUID: GPU-...)"; MIG instances are indented lines under their GPU.
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


def worker_count(settings_device: str, gpu_count: Callable[[], int] = visible_gpu_count) -> int:
    """gunicorn's ``workers`` for ``RIVULET_DEVICE``: one per visible GPU for ``cuda`` and ``auto``, at
    least one; a single worker for ``cpu``, ``mps`` and ``cuda:N`` (one named device)."""
    if settings_device.strip() in ALL_GPUS or not settings_device.strip():
        return max(1, gpu_count())
    return 1


def assign_slot(live_workers: Iterable[Any], workers: int) -> int:
    """The slot for a worker about to be forked: the one held by the fewest live workers, lowest first.

    Normally that is the slot of the worker that just died (held by none). During a reload (SIGHUP)
    gunicorn starts all new workers before it stops the old ones: the new ones then take slots 0..n-1 in
    turn (each held by one old worker), and the old ones go. Slots beyond ``workers`` (the worker count
    was lowered with TTOU) are left to die out.
    """
    held = Counter(getattr(worker, SLOT_ATTR, None) for worker in live_workers)
    return min(range(max(1, workers)), key=lambda slot: (held[slot], slot))


def worker_slot(environ: Mapping[str, str] | None = None) -> int:
    """This worker's slot; 0 outside gunicorn (tests, another server), i.e. the first device."""
    environ = os.environ if environ is None else environ
    raw = environ.get(SLOT_ENV, "").strip()
    return int(raw) if raw.isdigit() else 0


def worker_device(settings_device: str, slot: int | None = None,
                  cuda_count: Callable[[], int] | None = None) -> str:
    """The device this worker serves for ``RIVULET_DEVICE``: ``cuda`` -> ``cuda:<slot>``; ``auto`` ->
    the same when torch sees a GPU, else ``cpu``; anything else (``cpu``, ``mps``, ``cuda:N``) unchanged.
    Called in the worker, after fork, where torch may look at CUDA. More workers than GPUs (``-w``
    raised by hand) wrap around."""
    if settings_device not in ALL_GPUS:
        return settings_device
    if cuda_count is None:
        import torch  # in the worker only: the master never imports torch

        cuda_count = torch.cuda.device_count
    count = cuda_count()
    slot = worker_slot() if slot is None else slot
    if count == 0:
        if slot > 0:  # the master saw GPUs that torch does not (e.g. a CPU-only torch build)
            log.warning("worker slot %s: torch sees no CUDA device; each worker runs on the CPU with its "
                        "own model copy (set RIVULET_DEVICE=cpu for one worker)", slot)
        return "cpu" if settings_device == "auto" else "cuda"  # plain "cuda" fails clearly where it loads
    return f"cuda:{slot % count}"
