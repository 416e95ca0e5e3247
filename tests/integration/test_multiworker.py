"""Two gunicorn workers behind one port (RIVULET_DEVICE=cpu, -w 2): each has its own device slot, a
killed worker is replaced in the same slot, and /metrics (answered by either) reports both workers.

The server runs the misbehaving test package: its "slow" mode ticks until the client hangs up, so open
streams stay open exactly as long as the test holds them, without timing anything. Which worker served
what is read from Prometheus' per-process files, the files the merged /metrics is made of.
"""
from __future__ import annotations

import os
import re
import signal
import time
from collections import defaultdict
from pathlib import Path

import requests
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.streams import open_stream
from tests.live_server import live_server
from tests.sse_client import DONE

PACKAGE = Path(__file__).resolve().parents[1] / "fixtures" / "packages" / "misbehaving"
SSE = "/v1/sse"
SLOW = {"mode": "slow", "interval_ms": 200}
SLOT_LINE = re.compile(r"worker (\d+) has device slot (\d+)")


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        time.sleep(0.05)
    return result


def scrape(server) -> dict[str, float]:
    """/metrics through the one port: unlabelled samples by name, requests_total by route and status."""
    text = requests.get(server.url + "/metrics", timeout=10).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{sample.labels[k]}" for k in ("route", "status") if k in sample.labels)
            values[key] = sample.value
    return values


def per_worker(directory: Path, name: str, route: str | None = None) -> dict[int, float]:
    """One metric's value in each worker's own files (pid -> value)."""
    files = defaultdict(list)
    for path in directory.glob("*.db"):
        files[int(path.stem.rsplit("_", 1)[1])].append(str(path))
    values = {}
    for pid, paths in files.items():
        samples = [s for m in MultiProcessCollector.merge(paths) for s in m.samples
                   if s.name == name and (route is None or s.labels.get("route") == route)]
        values[pid] = sum(s.value for s in samples)
    return values


def slots(server) -> dict[int, int]:
    """slot -> pid of the latest worker the master forked into it."""
    return {int(slot): int(pid) for pid, slot in SLOT_LINE.findall(server.log())}


def stream_once(server) -> list:
    response = requests.post(server.url + SSE, json={"mode": "ok", "count": 1}, timeout=30)
    assert response.status_code == 200
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


def test_two_workers_one_port_one_metrics_endpoint_and_stable_device_slots(tmp_path):
    directory = tmp_path / "prometheus"
    env = {"RIVULET_MODEL": str(PACKAGE), "RIVULET_DEVICE": "cpu", "RIVULET_REQUEST_TIMEOUT_S": "120",
           "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with live_server(env, log_dir=tmp_path, extra_args=("-w", "2")) as server:
        wait_until(lambda: server.log().count("engine ready") == 2, what="both workers ready")
        first_slots = slots(server)
        assert sorted(first_slots) == [0, 1] and len(set(first_slots.values())) == 2

        # Short requests until both workers have served some: each worker counts only its own.
        sent = 0
        while len([n for n in per_worker(directory, "rivulet_requests_total", SSE).values() if n]) < 2:
            assert sent < 200, f"one worker served every request: {per_worker(directory, 'rivulet_requests_total')}"
            assert stream_once(server)[-1] == DONE
            sent += 1
        wait_until(lambda: scrape(server).get(f"rivulet_requests_total|{SSE}|200") == sent,
                   what=f"{sent} requests counted over both workers")

        # Open streams until each worker holds at least one; the gauges add both workers' up.
        held = []
        while len([n for n in per_worker(directory, "rivulet_open_streams").values() if n]) < 2:
            assert len(held) < 30, "one worker took every stream"
            # A worker runs one package request at a time: the next ones queue, their stream open (retry: sent).
            held.append(open_stream(server, SLOW, path=SSE, until=b"retry:"))
        metrics = scrape(server)
        assert metrics["rivulet_open_streams"] == len(held)
        # running/waiting of the worker not answering the scrape are refreshed every second.
        wait_until(lambda: (lambda m: m["rivulet_requests_running"] + m["rivulet_requests_waiting"])(scrape(server))
                   == len(held), what="running + waiting = open streams")

        # Kill the worker in slot 1 mid-stream: its gauges leave /metrics, its counts stay, and the
        # master forks its replacement into the same slot.
        victim = first_slots[1]
        survivor_streams = per_worker(directory, "rivulet_open_streams")[first_slots[0]]
        os.kill(victim, signal.SIGKILL)
        replacement = wait_until(lambda: slots(server)[1] != victim and slots(server)[1], what="a replacement")
        assert slots(server)[0] == first_slots[0] and replacement != first_slots[0]
        wait_until(lambda: scrape(server)["rivulet_open_streams"] == survivor_streams,
                   what="the dead worker's open streams leave the gauge")
        assert scrape(server)[f"rivulet_requests_total|{SSE}|200"] == sent

        for sock in held:
            sock.close()
        wait_until(lambda: (lambda m: (m["rivulet_open_streams"], m["rivulet_requests_running"],
                                       m["rivulet_requests_waiting"]))(scrape(server)) == (0, 0, 0),
                   what="every gauge back to 0")
        wait_until(lambda: server.log().count("engine ready") == 3, what="the replacement ready")


def test_without_a_named_directory_the_master_makes_one_and_removes_it_at_exit(tmp_path):
    env = {"RIVULET_MODEL": str(PACKAGE), "PROMETHEUS_MULTIPROC_DIR": ""}
    with live_server(env, log_dir=tmp_path) as server:
        assert stream_once(server)[-1] == DONE
        directory = Path(re.search(r"metrics of all workers are merged in (\S+)", server.log()).group(1))
        assert directory.is_dir() and list(directory.glob("counter_*.db"))
        wait_until(lambda: scrape(server).get(f"rivulet_requests_total|{SSE}|200") == 1, what="the request counted")
    assert not directory.exists()
