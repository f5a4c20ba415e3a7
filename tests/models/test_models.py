"""Model preparation: downloads fail fast and clearly offline (the Kolors folder: test_kolors_folder.py)."""

import pytest

from kolors_story.models import hub
from kolors_story.errors import UserError


def test_offline_download_fails_fast_naming_id_and_key(tmp_path):
    import time

    start = time.monotonic()
    with pytest.raises(UserError) as err:
        hub.download_model("Kwai-Kolors/Kolors-diffusers", tmp_path / "k", "models.kolors")
    assert time.monotonic() - start < 60
    assert "Kwai-Kolors/Kolors-diffusers" in str(err.value) and "models.kolors" in str(err.value)


def test_offline_download_names_every_model_the_run_still_needs_in_seconds(tmp_path, closed_endpoint):
    import time

    needed = {"Kwai-Kolors/Kolors-diffusers": "resources/modelscope/Kwai-Kolors/Kolors-diffusers",
              "AI-ModelScope/aesthetics": "resources/modelscope/AI-ModelScope/aesthetics"}
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        hub.download_model("Kwai-Kolors/Kolors-diffusers", tmp_path / "k", "models.kolors", needed=needed)
    assert time.monotonic() - start < 5  # the preflight, not the hub client's retries
    message = str(err.value)
    assert f"no network (cannot connect to {closed_endpoint}" in message and "models.kolors" in message
    for model_id, folder in needed.items():
        assert f"{model_id} -> {folder}" in message
