"""The README's curl and Python examples, run as written against the live demo server.

Only the address is changed (the server listens on a free port, not 8080). If an example in the README
stops working, this fails: the README is what a new user copies.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
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
