"""Fixtures more than one test folder uses."""

import pytest
from closed_endpoint import CLOSED_ENDPOINT


@pytest.fixture
def closed_endpoint(monkeypatch):
    """MODELSCOPE_ENDPOINT at a closed local port, read afresh: the hub client caches its config
    per process, so that cache is cleared here and restored by monkeypatch afterwards."""
    import modelscope_hub.config

    monkeypatch.setenv("MODELSCOPE_ENDPOINT", CLOSED_ENDPOINT)
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    return CLOSED_ENDPOINT


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """The demo's prompt-writer model (kolors_story.models.random_qwen), built once per session."""
    from kolors_story.models.random_qwen import build_random_qwen, qwen_tiktoken_file

    return build_random_qwen(tmp_path_factory.mktemp("qwen") / "qwen", qwen_tiktoken_file())
