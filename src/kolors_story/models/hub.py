"""Model preparation: fetch a ModelScope id, describe a model folder, check the aesthetic predictor's folder.

The Kolors folder has its own owner (kolors_story.models.kolors_folder). Checks run before any GPU work
so that a half-downloaded or wrong folder is reported with the list of missing files instead of a
deep stack trace from from_pretrained.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.files import ensure_space
from kolors_story.modelscope_endpoint import HubDownload, StillNeeded, offline_reason

log = logging.getLogger(__name__)

AESTHETIC_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)



def check_aesthetic_dir(path: Path, config_key: str = "models.aesthetic") -> None:
    """Raise UserError naming every file the predictor folder lacks (model, preprocessing, tokenizer)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"Aesthetic predictor folder {path} does not exist. Download the model "
            "(AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE) there, or set "
            f"config key `{config_key}` to a folder that holds it."
        )
    required = ("config.json", "preprocessor_config.json")
    missing = [name for name in required if not (path / name).is_file()]
    if not any((path / name).is_file() for name in AESTHETIC_WEIGHT_FILES):
        missing.append("weights (one of " + ", ".join(AESTHETIC_WEIGHT_FILES) + ")")
    has_tokenizer = (path / "tokenizer.json").is_file() or all(
        (path / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        missing.append("tokenizer (tokenizer.json, or vocab.json + merges.txt; CLIPProcessor needs it)")
    if missing:
        raise UserError(
            f"Aesthetic predictor folder {path} is incomplete; missing: {'; '.join(missing)}. "
            "It must hold a saved AestheticsPredictorV2Linear plus its CLIPProcessor files "
            "(as in AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE); "
            f"download it again, rebuild the tiny one, or fix config key `{config_key}`."
        )


DOWNLOAD_ATTEMPTS = 3  # a dropped connection mid-download is retried here, not by Snakemake
RETRY_WAIT_S = 5.0


def download_model(model_id: str, out_dir: Path, config_key: str, needed: StillNeeded | None = None) -> Path:
    """snapshot_download a ModelScope model into out_dir. The hub is asked first whether it can be
    reached at all: offline, this fails in seconds, naming every hub download of the run that is not
    there yet (`needed`, the same list in every download job) and the config key of each."""
    from modelscope import snapshot_download

    if reason := offline_reason():
        needed = needed or StillNeeded([HubDownload("model", model_id, str(out_dir), config_key)])
        raise UserError(
            f"{config_key}: cannot download ModelScope model '{model_id}': no network ({reason}).\n{needed.text()}"
        )
    if (size := _model_size(model_id)) is not None:
        ensure_space(Path(out_dir), size, f"the download of {model_id}")
    start = time.monotonic()
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return Path(snapshot_download(model_id, local_dir=str(out_dir)))
        except Exception as err:  # modelscope raises HubError/NetworkError/OSError/requests errors
            if attempt == DOWNLOAD_ATTEMPTS or "404" in str(err) or "not exist" in str(err).lower():
                raise UserError(
                    f"{config_key}: could not download ModelScope model '{model_id}' after "
                    f"{time.monotonic() - start:.0f} s and {attempt} attempt(s) ({type(err).__name__}: "
                    f"{str(err)[:200]}). Check the id; without network, download it elsewhere and set "
                    f"{config_key} to the local folder (a path starting with /, ./ or resources/)."
                ) from None
            log.warning("download of %s failed (%s); attempt %d of %d in %.0f s", model_id,
                        type(err).__name__, attempt + 1, DOWNLOAD_ATTEMPTS, RETRY_WAIT_S)
            time.sleep(RETRY_WAIT_S)
    raise AssertionError("unreachable")


def _model_size(model_id: str) -> int | None:
    """The bytes of a hub model's files (HubApi.get_model_files: [{"Path", "Size"}]), or None when
    the hub does not say (the download then reports a full disk as it happens)."""
    from modelscope.hub.api import HubApi

    try:
        return sum(int(f.get("Size") or 0) for f in HubApi().get_model_files(model_id, recursive=True))
    except Exception as err:  # noqa: BLE001 (a size we cannot learn must not stop the download)
        log.info("size of %s unknown (%s); free space not checked before the download", model_id, type(err).__name__)
        return None


def describe_model(path: Path) -> dict:
    """Small summary for the manifest: where the model is and hashes of its config files."""
    from kolors_story.files import sha256_file

    path = Path(path)
    configs = sorted(p for p in path.rglob("*.json") if p.stat().st_size < 1_000_000)
    return {
        "path": str(path),  # as configured: results hold no absolute paths
        "config_sha256": {str(p.relative_to(path)): sha256_file(p) for p in configs},
    }

