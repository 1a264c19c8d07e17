"""Fixtures of the unit tests that several files share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M's tokenizer (its GGUF file's, converted once)."""
    from tensorpar.loading import open_source

    return open_source("smollm2-135m").tokenizer()


@pytest.fixture(scope="session")
def compiler(tokenizer):
    """Guided decoding's compiler for that tokenizer."""
    from tensorpar.runtime.guided import GuidedCompiler

    return GuidedCompiler(tokenizer)
