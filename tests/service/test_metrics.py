"""Metrics in both modes: one registry per app in one process; every worker's values through any worker's
/metrics in multiprocess mode (each "worker" here is a short Python process writing to the shared
directory, as gunicorn's forked workers do)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from service import metrics_dir
from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]

# One worker: its engine has `running` requests in the batch and one queued, it finished `running`
# requests and holds one open stream; prints its pid, then (when asked) its /metrics answer.
WORKER = """
import os, sys
from service.metrics import Metrics
running = int(sys.argv[1])
m = Metrics(running=lambda: running, waiting=lambda: 1)
m.requests.labels(route="/v1/sse", status="200").inc(running)
m.open_streams.inc()
m.refresh_engine_gauges()  # what keep_engine_gauges_fresh does every second in a gunicorn worker
print(os.getpid())
if sys.argv[2:] == ["scrape"]:
    print(m.render()[0].decode())
"""


def run_worker(directory: Path, running: int, scrape: bool = False) -> tuple[int, dict[str, float]]:
    env = {**os.environ, metrics_dir.MULTIPROC_DIR_ENV: str(directory)}
    done = subprocess.run([sys.executable, "-c", WORKER, str(running), *(["scrape"] if scrape else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pid, _, exposition = done.stdout.partition("\n")
    values = {(s.name + ("{%s}" % s.labels["route"] if "route" in s.labels else "")): s.value
              for family in text_string_to_metric_families(exposition) for s in family.samples}
    return int(pid), values


def test_one_process_keeps_one_registry_per_app_and_reads_the_engine_at_scrape_time():
    queue = [3]
    first = Metrics(running=lambda: 1, waiting=lambda: queue[0])
    second = Metrics(running=lambda: 7, waiting=lambda: 0)
    first.requests.labels(route="/v1/sse", status="200").inc()
    queue[0] = 4
    assert not first.multiprocess
    assert first.registry.get_sample_value("rivulet_requests_waiting") == 4
    assert second.registry.get_sample_value("rivulet_requests_running") == 7
    assert second.registry.get_sample_value("rivulet_requests_total", {"route": "/v1/sse", "status": "200"}) is None
    assert b"rivulet_requests_waiting 4.0" in first.render()[0]


def test_any_worker_reports_every_worker_and_a_dead_ones_gauges_leave(tmp_path, monkeypatch):
    first_pid, _ = run_worker(tmp_path, running=2)
    _, merged = run_worker(tmp_path, running=3, scrape=True)
    # Counters and gauges of both; the first has exited but was not reported dead yet.
    assert merged["rivulet_requests_total{/v1/sse}"] == 5
    assert merged["rivulet_requests_running"] == 5
    assert merged["rivulet_requests_waiting"] == 2
    assert merged["rivulet_open_streams"] == 2

    monkeypatch.setenv(metrics_dir.MULTIPROC_DIR_ENV, str(tmp_path))
    metrics_dir.mark_worker_dead(first_pid)  # what gunicorn.conf.py's child_exit does
    _, after = run_worker(tmp_path, running=0, scrape=True)
    assert after["rivulet_requests_total{/v1/sse}"] == 5  # totals keep the dead worker's counts
    assert after["rivulet_requests_running"] == 3  # the second (never reported dead) + the third's 0
    assert after["rivulet_open_streams"] == 2  # the second's and the third's, not the dead one's


def test_the_master_creates_and_exports_a_directory_when_none_is_named():
    environ: dict[str, str] = {}
    path, created = metrics_dir.prepare(environ)
    try:
        assert created and path.is_dir() and environ[metrics_dir.MULTIPROC_DIR_ENV] == str(path)
    finally:
        metrics_dir.remove(path)
    assert not path.exists()


def test_a_named_directory_is_emptied_of_the_last_runs_values(tmp_path):
    named = tmp_path / "metrics"
    named.mkdir()
    run_worker(named, running=4)
    assert list(named.glob("*.db"))
    (named / "README").write_text("not ours")
    path, created = metrics_dir.prepare({metrics_dir.MULTIPROC_DIR_ENV: str(named)})
    assert path == named and not created
    assert not list(named.glob("*.db")) and (named / "README").exists()
    assert metrics_dir.prepare({metrics_dir.MULTIPROC_DIR_ENV: str(tmp_path / "new")})[0].is_dir()


GAPS = [0.0, 0.0009, 0.001, 0.0011, 0.004, 0.04, 0.04, 1.28, 5.0, 0.3]

# A worker that observes GAPS in the inter-token histogram, one at a time or in one batch, then scrapes.
OBSERVER = """
import sys
from service.metrics import Metrics, observe_many
from tests.service.test_metrics import GAPS
m = Metrics(running=lambda: 0, waiting=lambda: 0)
if sys.argv[1] == "batched":
    observe_many(m.inter_token_latency, GAPS)
else:
    for gap in GAPS:
        m.inter_token_latency.observe(gap)
print(m.render()[0].decode())
"""


def histogram_samples(exposition: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for family in text_string_to_metric_families(exposition)
            for s in family.samples if s.name.startswith("rivulet_inter_token_latency_seconds")}


def observed(how: str, directory: Path | None) -> dict[tuple[str, str], float]:
    env = {k: v for k, v in os.environ.items() if k != metrics_dir.MULTIPROC_DIR_ENV}
    if directory is not None:
        env[metrics_dir.MULTIPROC_DIR_ENV] = str(directory)
    done = subprocess.run([sys.executable, "-c", OBSERVER, how], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return histogram_samples(done.stdout)


def test_observing_a_batch_writes_what_observing_each_value_does(tmp_path):
    """Streams write their inter-token gaps in batches (service/jobs.py): the histogram must come out the
    same, bucket by bucket, in one process and in gunicorn's multiprocess mode."""
    for directory in (None, tmp_path / "one", tmp_path / "batched"):
        if directory is not None:
            directory.mkdir()
    single = observed("one", None), observed("batched", None)
    multi = observed("one", tmp_path / "one"), observed("batched", tmp_path / "batched")
    for one_by_one, batched in (single, multi):
        assert one_by_one[("rivulet_inter_token_latency_seconds_count", "")] == len(GAPS)
        assert one_by_one[("rivulet_inter_token_latency_seconds_bucket", "0.001")] == 3  # bounds are inclusive
        assert batched == one_by_one
