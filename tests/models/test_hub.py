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


def test_offline_download_names_every_download_the_run_still_needs_in_seconds(tmp_path, closed_endpoint):
    import time

    from kolors_story.modelscope_endpoint import HubDownload, StillNeeded

    needed = StillNeeded([
        HubDownload("model", "Kwai-Kolors/Kolors-diffusers", "resources/modelscope/Kwai-Kolors/Kolors-diffusers", "models.kolors"),
        HubDownload("dataset", "AI-ModelScope/lowres_anime", "resources/datasets/AI-ModelScope/lowres_anime", "dataset.path"),
    ])
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        hub.download_model("Kwai-Kolors/Kolors-diffusers", tmp_path / "k", "models.kolors", needed=needed)
    assert time.monotonic() - start < 5  # the preflight, not the hub client's retries
    message = str(err.value)
    assert f"no network (cannot connect to {closed_endpoint}" in message and "models.kolors" in message
    assert "still needs 2 download(s)" in message
    for item in needed:
        assert f"{item.repo_id} -> {item.folder}" in message and item.fetch_command() in message


def test_a_download_larger_than_the_free_space_is_refused_before_it_starts(tmp_path, monkeypatch):
    import shutil

    from kolors_story.files import NoSpace

    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    monkeypatch.setattr(hub, "_model_size", lambda model_id: 17 << 30)  # the hub's file list says 17 GiB
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4 << 30))
    with pytest.raises(NoSpace, match=r"\(the download of Kwai-Kolors/Kolors-diffusers\): 18\.7 GiB needed, 4\.0 GiB free"):
        hub.download_model("Kwai-Kolors/Kolors-diffusers", tmp_path / "k", "models.kolors")
