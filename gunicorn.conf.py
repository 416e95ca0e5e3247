"""gunicorn settings for Rivulet: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Any setting can be overridden on the command line (``-b 127.0.0.1:9000``) or through
``GUNICORN_CMD_ARGS`` (``GUNICORN_CMD_ARGS="--graceful-timeout 5"``), which both take precedence over
this file. Rivulet's own settings are ``RIVULET_*`` environment variables (service/settings.py).

The hooks import Rivulet lazily: the master never imports the app, torch or gevent's patched world.
"""

# --- socket -------------------------------------------------------------------------------------
# All interfaces, port 8080 (the port ModelArts and the Dockerfile expect); -b overrides it.
bind = "0.0.0.0:8080"
# Connections waiting to be accepted while the worker is busy accepting others.
backlog = 2048

# --- workers ------------------------------------------------------------------------------------
# One worker per GPU (one on a CPU): each worker loads its own copy of the model and runs its own
# engine thread, so more workers than devices only multiplies memory.
workers = 1
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
# Idle keep-alive connections are closed after this many seconds.
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
    every worker (containers often start at 1024). Workers inherit it."""
    from service.limits import SPARE_FILES, raise_open_files_limit

    before, now = raise_open_files_limit(server.cfg.worker_connections)
    if now != before:
        server.log.info("open files limit raised from %s to %s", before, now)
    if now < server.cfg.worker_connections + SPARE_FILES:
        server.log.warning("open files are limited to %s: fewer than %s streams fit; raise the hard limit "
                           "(ulimit -Hn, docker run --ulimit nofile=...)", now, server.cfg.worker_connections)


def post_worker_init(worker):
    """In the forked worker, app loaded: start the engine thread (it loads the model) and return at once,
    so the worker serves /health and a 503 /ready while the weights load. Also watches for SIGTERM to
    drain gracefully."""
    from service.lifecycle import on_worker_start

    on_worker_start(worker)
    worker.log.info("Rivulet worker %s started; the model loads in the background", worker.pid)


def worker_exit(server, worker):
    """The worker is exiting: let resumable streams read through other replicas end (within the grace
    time: the drain ends them before it runs out), then stop the engine thread so a model package's
    finalize() runs."""
    from service.lifecycle import on_worker_exit
    from service.routes_streams import wait_for_stream_work

    if getattr(worker, "wsgi", None) is not None:
        wait_for_stream_work(worker.wsgi, timeout=float(worker.cfg.graceful_timeout))
    on_worker_exit(worker)
