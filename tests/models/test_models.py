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
