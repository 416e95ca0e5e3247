"""deploy/compose.yaml and deploy/nginx.conf, checked without a Docker engine (none runs here): the pieces
name each other correctly, and the settings that make streams work across replicas are there.
(deploy/nginx.conf itself runs for real in tests/integration/test_replicas.py.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose.yaml"
NGINX = ROOT / "deploy" / "nginx.conf"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def nginx_directives() -> list[str]:
    """Directive lines of deploy/nginx.conf, comments stripped."""
    lines = (line.split("#", 1)[0].strip() for line in NGINX.read_text().splitlines())
    return [line for line in lines if line]


def replicas(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("build")}


def test_nginx_proxies_to_every_replica_service_on_gunicorns_port(compose):
    upstream = {m.group(1) for line in nginx_directives() if (m := re.match(r"server\s+([\w.-]+):8080\b", line))}
    assert upstream == set(replicas(compose)) and len(upstream) >= 2
    nginx = compose["services"]["nginx"]
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert set(nginx["depends_on"]) == upstream


def test_every_replica_shares_the_redis_store_and_outlives_gunicorns_grace_time(compose):
    graceful = float(re.search(r"^graceful_timeout = (\d+)", (ROOT / "gunicorn.conf.py").read_text(), re.M)[1])
    for name, svc in replicas(compose).items():
        assert (ROOT / "deploy" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
        store = svc["environment"]["RIVULET_STREAM_STORE"]
        Settings.from_env({"RIVULET_STREAM_STORE": store})  # a URL the settings accept
        host = re.match(r"redis://([\w.-]+):", store)[1]
        assert host in compose["services"] and "redis-server" in compose["services"][host]["command"]
        assert float(svc["stop_grace_period"].removesuffix("s")) > graceful, name


def test_nginx_keeps_streams_unbuffered_and_open_longer_than_the_heartbeat():
    directives = nginx_directives()
    assert "proxy_buffering off;" in directives
    assert "proxy_http_version 1.1;" in directives and 'proxy_set_header Connection "";' in directives
    assert not any(d.startswith("proxy_ignore_headers") and "X-Accel-Buffering" in d for d in directives)
    read_timeout = next(int(re.match(r"proxy_read_timeout (\d+)s;", d)[1])
                        for d in directives if d.startswith("proxy_read_timeout"))
    defaults = Settings.from_env({})
    assert read_timeout > max(defaults.heartbeat_s, defaults.request_timeout_s)
