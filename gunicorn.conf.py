"""gunicorn settings for Rivulet: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Any setting can be overridden on the command line (``-b 127.0.0.1:9000``) or through
``GUNICORN_CMD_ARGS`` (``GUNICORN_CMD_ARGS="--graceful-timeout 5"``), which both take precedence over
this file. Rivulet's own settings are ``RIVULET_*`` environment variables (service/settings.py).

The hooks import Rivulet lazily: the master never imports the app, torch or gevent's patched world
(service.devices, imported below for the worker count, is light on purpose).
"""
import os

from service.devices import worker_count

# --- socket -------------------------------------------------------------------------------------
# All interfaces, port 8080 (the port ModelArts and the Dockerfile expect); -b overrides it.
bind = "0.0.0.0:8080"
# Connections waiting to be accepted while the worker is busy accepting others.
backlog = 2048

# --- workers ------------------------------------------------------------------------------------
# One worker per GPU (one on a CPU): each worker loads its own copy of the model and runs its own
# engine thread, so more workers than devices only multiplies memory. RIVULET_DEVICE=cuda (or auto on a
# machine with GPUs) starts one worker per visible GPU, worker i on cuda:i (the pre_fork/post_fork hooks
# below); cpu, mps and cuda:N start one. GPUs are counted without CUDA (service/devices.py).
workers = worker_count(os.environ.get("RIVULET_DEVICE", "auto"))
# gevent: one greenlet per connection, so thousands of open event streams cost ~20 KB each, not a thread.
worker_class = "gevent"
# Open connections per worker. Streams are long-lived; the engine's own bound is RIVULET_MAX_WAITING.
worker_connections = 10000
# Never recycle the worker after N requests: a restart reloads the model and drops every open stream.
max_requests = 0
# Never import the app in the master: the engine thread and CUDA must be created after fork.
preload_app = False

# --- timeouts -----------------------------------------------------------------------------------
# For gevent workers this is only the master's liveness check of the worker (the hub keeps notifying
# it while torch computes on the engine thread); a long generation never trips it.
timeout = 30
# After SIGTERM/SIGHUP: running generations get this long to finish. Shortly before it ends
# (service.lifecycle.SHUTDOWN_MARGIN_S), every stream still open ends with a shutdown error event and
# [DONE] instead of being cut mid-chunk. Keep it above RIVULET_REQUEST_TIMEOUT_S to let every request end.
graceful_timeout = 45
# Idle keep-alive connections are closed after this many seconds. The gevent worker also reads each
# request head (request line + headers) under this timer: a client that sends half a head (slowloris) is
# dropped after it. Keep it above 0: at 0 heads are read with no time limit. The body is bounded by
# RIVULET_BODY_TIMEOUT_S; answers (streams) by neither.
keepalive = 5

# --- logging ------------------------------------------------------------------------------------
# Errors and Rivulet's own lines (one JSON line per request, logger "rivulet.request") go to stderr.
errorlog = "-"
loglevel = "info"
# No access log by default: the request log line carries more (tokens, time to first token).
accesslog = None


# --- hooks --------------------------------------------------------------------------------------
def on_starting(server):
    """In the master, before forking: lift the open-files limit so worker_connections streams fit in
    every worker (containers often start at 1024). Workers inherit it. Also prepare Prometheus'
    multiprocess directory, so /metrics through one port reports every worker (service/metrics.py).
    And let torch's CPU allocator ask for transparent huge pages for its large tensors (the KV cache; the
    weights are moved into them at load, models/huge_pages.py): fewer TLB misses when a step streams
    them, 6-8% a decode step on a CPU (bench/README.md section 12).
    Workers read it at their first large allocation; THP_MEM_ALLOC_ENABLE=0 in the environment keeps it off."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from service import metrics_dir

    # First: prometheus_client reads the variable when it is first imported, in the workers.
    path, created = metrics_dir.prepare()
    server.rivulet_metrics_dir = path if created else None
    server.log.info("metrics of all workers are merged in %s", path)

    from service.limits import SPARE_FILES, raise_open_files_limit

    before, now = raise_open_files_limit(server.cfg.worker_connections)
    if now != before:
        server.log.info("open files limit raised from %s to %s", before, now)
    if server.cfg.keepalive <= 0:
        server.log.warning("keepalive is 0: request heads are read with no time limit, so clients that "
                           "send half a request hold their connection forever; set keepalive > 0")
    if now < server.cfg.worker_connections + SPARE_FILES:
        server.log.warning("open files are limited to %s: fewer than %s streams fit; raise the hard limit "
                           "(ulimit -Hn, docker run --ulimit nofile=...)", now, server.cfg.worker_connections)


def pre_fork(server, worker):
    """In the master, before each fork: give the new worker a device slot, the lowest one no live worker
    holds, so a replaced worker serves its predecessor's GPU."""
    from service.devices import SLOT_ATTR, assign_slot

    setattr(worker, SLOT_ATTR, assign_slot(server.WORKERS.values(), server.num_workers))


def post_fork(server, worker):
    """In the forked worker, before the app loads: export its slot; the app turns it into its device
    (service.devices.worker_device: RIVULET_DEVICE=cuda -> cuda:<slot>)."""
    from service.devices import SLOT_ATTR, SLOT_ENV

    slot = getattr(worker, SLOT_ATTR)
    os.environ[SLOT_ENV] = str(slot)
    server.log.info("worker %s has device slot %s", worker.pid, slot)

    from service.gunicorn_errors import install

    install()  # gunicorn's own 400s (a malformed request line or header) as JSON, like every other error


def post_worker_init(worker):
    """In the forked worker, app loaded: start the engine thread (it loads the model) and return at once,
    so the worker serves /health and a 503 /ready while the weights load. Also watches for SIGTERM to
    drain gracefully."""
    from service.lifecycle import on_worker_start

    on_worker_start(worker)
    worker.log.info("Rivulet worker %s started; the model loads in the background", worker.pid)

    from service.metrics import keep_engine_gauges_fresh

    # Multiprocess metrics: the queue gauges of this worker must reach scrapes answered by the others.
    keep_engine_gauges_fresh(worker.wsgi.extensions["rivulet"].metrics)


def worker_exit(server, worker):
    """The worker is exiting: let resumable streams read through other replicas end (within the grace
    time: the drain ends them before it runs out), then stop the engine thread so a model package's
    finalize() runs."""
    from service.lifecycle import on_worker_exit
    from service.routes_streams import wait_for_stream_work

    if getattr(worker, "wsgi", None) is not None:
        wait_for_stream_work(worker.wsgi, timeout=float(worker.cfg.graceful_timeout))
    on_worker_exit(worker)


def child_exit(server, worker):
    """In the master, a worker has exited (stopped or crashed): its live gauges (running, waiting, open
    streams) stop counting in /metrics; its counters stay in the totals."""
    from service import metrics_dir

    metrics_dir.mark_worker_dead(worker.pid)


def on_exit(server):
    """The master is exiting: remove the metrics directory it created (not one PROMETHEUS_MULTIPROC_DIR
    named: that one is emptied at the next start)."""
    from service import metrics_dir

    if server.rivulet_metrics_dir is not None:
        metrics_dir.remove(server.rivulet_metrics_dir)
