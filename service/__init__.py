"""Rivulet's web side: the Flask app factory. Serve it with ``gunicorn -c gunicorn.conf.py wsgi:app``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from service.settings import Settings

if TYPE_CHECKING:
    from models.serving import Backend


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> Flask:
    """Build the app for ``settings`` (default: read from RIVULET_* variables). ``backend``: a ready-made
    engine Backend to serve instead of the one RIVULET_MODEL names (tests, embedding).

    Nothing heavy happens here: the model's config and tokenizer are read (a bad RIVULET_MODEL fails now,
    at start-up), but the weights load on the engine thread, which ``service.lifecycle.on_worker_start``
    starts after gunicorn forks the worker. Until then ``/ready`` says 503.
    """
    from service import (
        auth, cors, errors, request_log, routes_demo, routes_docs, routes_health, routes_openai, routes_package,
        routes_streams, routes_test_hooks,
    )
    from service.lifecycle import Runtime

    settings = settings or Settings.from_env()
    runtime = Runtime.build(settings, backend=backend)

    app = Flask(__name__)
    # One byte over the limit: Werkzeug then stops a chunked body just past it, and service.body.json_body
    # (which every body-taking route uses) tells "exactly the limit" from "too large" and answers 413.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    app.json.ensure_ascii = False
    app.json.sort_keys = False
    app.extensions["rivulet"] = runtime

    request_log.init_app(app, runtime.metrics)  # first: every later hook's answer gets a request id
    auth.init_app(app, settings, runtime.metrics)
    errors.register(app)
    cors.init_app(app, settings.cors_origins)

    app.register_blueprint(routes_health.bp)
    app.register_blueprint(routes_openai.bp)
    app.register_blueprint(routes_package.bp)
    app.register_blueprint(routes_streams.bp)
    app.register_blueprint(routes_demo.bp)
    app.register_blueprint(routes_docs.bp)
    if settings.test_hooks:
        app.register_blueprint(routes_test_hooks.bp)
    return app
