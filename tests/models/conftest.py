"""Shared, session-scoped artefacts: building them once keeps the engine tests fast on 2 cores."""
from __future__ import annotations

from pathlib import Path

import pytest

from models.tokenizer import Tokenizer
from tests.models.support import random_model, tiny_config, train_tokenizer, write_checkpoint


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_path) -> Path:
    """A random grouped-query Llama (4 heads, 2 key/value heads) in the HF layout, fp32."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), random_model(tiny_config(), seed=0), tokenizer_path)
