"""A model whose generations outlast any test: the demo model served with an 8192-token context.

Tests that need a request to still be running when they act (a full queue, a timeout, a shutdown) ask
for far more tokens than the demo's 512-token context allows, so that no generation can finish by itself
within the test however fast the machine is, and the expected ending of every stream is known in
advance. The weights are the demo's own (rotary positions need no trained table past 512; the text
past that is noise, which these tests never read).
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.live_server import ROOT

DEMO = ROOT / "models" / "demo"
LONG_CONTEXT = 8192
# Prompt + this fits LONG_CONTEXT; at the demo model's fastest (about a millisecond a step) it runs
# for seconds longer than any test waits.
ENDLESS_TOKENS = 8000


def long_context_demo(directory: Path) -> Path:
    """Write the checkpoint into ``directory`` (links to the demo's files, a config with the long
    context). -> the directory, for RIVULET_MODEL."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in DEMO.iterdir():
        if source.name != "config.json":
            (directory / source.name).symlink_to(source)
    config = json.loads((DEMO / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
