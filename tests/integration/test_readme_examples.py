"""The README's curl and Python examples, run as written against the live demo server.

Only the address is changed (the server listens on a free port, not 8080). If an example in the README
stops working, this fails: the README is what a new user copies.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.live_server import live_server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEFAULT_URL = "http://localhost:8080"


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n### {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def test_the_curl_examples_work(demo_server):
    (script,) = code_blocks(readme_section("curl"), "bash")
    assert "curl" in script
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(DEFAULT_URL, demo_server.url)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # Two streams (the ModelArts seed body and the chat stream), each ending with [DONE] ...
    assert out.count("data: [DONE]") == 2
    assert '"object":"chat.completion.chunk"' in out
    assert '"usage":' in out  # include_usage
    # ... a non-streaming completion, the model list, readiness and Prometheus text.
    assert '"object":"text_completion"' in out
    assert '"object":"list"' in out
    assert "rivulet_requests_total" in out


@pytest.mark.parametrize("block", [0, 1], ids=["openai-sdk", "requests"])
def test_the_python_examples_work(demo_server, block):
    source = code_blocks(readme_section("Python (the official `openai` SDK, unchanged)"), "python")[block]
    result = subprocess.run(
        [sys.executable, "-c", source.replace(DEFAULT_URL, demo_server.url)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "the example printed no streamed text"


def test_the_model_package_example_works(tmp_path):
    (script,) = [b for b in code_blocks(README.read_text(encoding="utf-8"), "bash")
                 if b.startswith("RIVULET_MODEL=models/packages/")]
    start, *client = script.strip().splitlines()
    env = dict(re.findall(r"(RIVULET_\w+)=(\S+)", start))
    assert start.endswith(".venv/bin/gunicorn -c gunicorn.conf.py wsgi:app")  # what live_server runs
    with live_server(env, log_dir=tmp_path) as srv:
        commands = "\n".join(client).replace(DEFAULT_URL, srv.url)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], capture_output=True, text=True,
                                timeout=60)
    assert result.returncode == 0, result.stderr
    assert '"word":"streams"' in result.stdout and "data: [DONE]" in result.stdout


# --- every block, as a newcomer copies it -----------------------------------------------------------


def run_here() -> list[str]:
    """The blocks the tests above run."""
    readme = README.read_text(encoding="utf-8")
    return [*code_blocks(readme_section("curl"), "bash"),
            *code_blocks(readme_section("Python (the official `openai` SDK, unchanged)"), "python"),
            *(b for b in code_blocks(readme, "bash") if b.startswith("RIVULET_MODEL=models/packages/"))]


# The other blocks, each by a line it holds, and why a test cannot run it as written (and what covers it).
NOT_RUN_HERE = {
    "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt &&":
        "the set-up itself: .ci/run installs the same requirements, live_server runs the same gunicorn command",
    "bash .ci/run": "the test command itself",
    ".venv/bin/pip install -r requirements-clients.txt":
        "requirements-test.txt includes it; test_the_python_examples_need_only_what_the_readme_installs",
    "pip install --index-url https://download.pytorch.org/whl/cpu torch": "downloads torch from PyTorch's index",
    "RIVULET_MODEL=/srv/models/": "needs a real checkpoint on disk",
    "RIVULET_DEVICE=cuda CUDA_VISIBLE_DEVICES=": "needs GPUs (test_devices.py drives the same hooks with fakes)",
    "retry: 3000": "an example of output, not a command",
    "from huaweicloudsdkcore.auth.credentials import BasicCredentials":
        "test_signed_auth.py runs this block against a server with its AK/SK in a key file",
    "kind: Secret": "a Kubernetes manifest: test_deploy.py validates deploy/kubernetes, which mounts the same way",
    "RIVULET_STREAM_STORE=redis://redis-host:6379/0 gunicorn":
        "needs a Redis host: test_replicas.py starts the same command against a real redis-server",
    "RIVULET_API_KEYS=my-secret docker compose up --build":
        "needs a Docker engine: test_deploy_compose.py checks the compose file and nginx config together",
    "redis-server --port 6379 --save '' --appendonly no &":
        "test_replicas.py runs this set-up (redis-server, two gunicorns, nginx) on free loopback ports",
    "apt-get install -y redis-server nginx    # .ci/run installs them": "the test command for this section",
    "kubectl apply -k deploy/kubernetes": "needs a Kubernetes cluster: test_deploy.py validates the manifests",
    "const r = await fetch(": "JavaScript for a page: the demo page (test_browser.py) makes the same calls",
    "npx newman run": "test_postman.py runs the same collection with newman",
    "docker build -t rivulet .":
        "needs a Docker engine: test_dockerfile.py lints the Dockerfile, test_runtime_install.py runs its "
        "install step",
}


def all_code_blocks() -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


def test_every_readme_block_is_run_here_or_says_why_not():
    ran = run_here()
    assert len(ran) == 4  # the curl block, two Python examples, the package example
    unaccounted = [block.strip().splitlines()[0] for block in all_code_blocks()
                   if block not in ran and not any(line in block for line in NOT_RUN_HERE)]
    assert unaccounted == [], "a new README block: run it in a test, or say in NOT_RUN_HERE why not"


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(canonicalize_name(Requirement(line).name))
    return names


def readme_installs(readme: str) -> set[str]:
    """What the README's ``pip install`` commands install: files after -r, and names given directly."""
    names: set[str] = set()
    for command in re.findall(r"pip install ([^`\n]+)", readme):
        words = command.split("&&")[0].split()
        for before, word in zip(["", *words], words):
            if before == "-r":
                names |= requirement_names(ROOT / word)
            elif not word.startswith("-") and not before.startswith("-"):  # not an option or its value
                names.add(canonicalize_name(Requirement(word).name))
    return names


def test_the_python_examples_need_only_what_the_readme_installs():
    readme = README.read_text(encoding="utf-8")
    installed = readme_installs(readme)
    assert "openai" in installed and "requests" in installed  # requirements-clients.txt
    distributions = importlib.metadata.packages_distributions()
    for block in code_blocks(readme, "python"):
        for node in ast.walk(ast.parse(block)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for module in (n.split(".")[0] for n in names):
                if module in sys.stdlib_module_names:
                    continue
                needed = {canonicalize_name(d) for d in distributions.get(module, [module])}
                assert needed & installed, f"the README's Python example imports {module}, which no " \
                                           f"pip install in the README installs"


def test_the_server_starts_without_torchs_numpy_warning(demo_server):
    # torch warns "Failed to initialize NumPy" at every start when numpy is missing: requirements.txt has it.
    assert "Failed to initialize NumPy" not in demo_server.log()
