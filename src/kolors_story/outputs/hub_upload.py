"""Upload of the bundle folder (publishing.build_bundle) to a ModelScope model repo.

The token comes from env MODELSCOPE_API_TOKEN only, never from config or params (Snakemake stores
params as plain text), and never appears in returned values, logs or errors.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from typing import Iterator
from pathlib import Path

from kolors_story.errors import UserError
from kolors_story.run_files import LORA_WEIGHT_NAME

TOKEN_ENV = "MODELSCOPE_API_TOKEN"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def modelscope_token() -> str:
    """The ModelScope token from env MODELSCOPE_API_TOKEN (the only place it is read from)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UserError(
            f"Uploading needs a ModelScope access token in the environment variable {TOKEN_ENV}: "
            f"create one at https://modelscope.cn/my/myaccesstoken, then `export {TOKEN_ENV}=...` "
            "before running snakemake (never put it in config.yaml). Or set `upload.enabled: false`."
        )
    return token


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _check_upload_args(bundle_dir: Path, repo_id: str, visibility: str) -> None:
    if not repo_id or not _REPO_ID.match(repo_id):
        raise UserError(
            f"ModelScope repo id {repo_id!r} is not of the form owner/name; set config key "
            "`upload.repo_id`, e.g. your-name/kolors-ink-lora."
        )
    if visibility not in ("public", "private"):
        raise UserError(
            f"Visibility {visibility!r} is not public or private; fix config key `upload.visibility`."
        )
    for name in (LORA_WEIGHT_NAME, "README.md"):
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise UserError(f"Bundle file {path} does not exist; build the bundle before uploading.")


class _LoggedErrors(logging.Handler):
    """Collects the exceptions the hub client logs: upload_folder reports per-file failures
    (a 403 among them) only in its log, then raises a StorageError that names none of them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.errors.extend(a for a in args if isinstance(a, BaseException))


@contextmanager
def _client_errors() -> Iterator[_LoggedErrors]:
    handler, hub_logger = _LoggedErrors(), logging.getLogger("modelscope_hub")
    hub_logger.addHandler(handler)
    try:
        yield handler
    finally:
        hub_logger.removeHandler(handler)


def _failure_hint(errors: list[BaseException]) -> str:
    """What to do about a hub failure, by the client's error classes (modelscope_hub.errors)."""
    kinds = {type(e).__name__ for e in errors}
    kind = next((k for k in ("PermissionDeniedError", "AuthenticationError") if k in kinds), "")
    if kind == "PermissionDeniedError":
        return (f"the token in {TOKEN_ENV} may not write to this repo: set `upload.repo_id` to a repo "
                "under your own account or organisation, or use a token with write access to it")
    if kind == "AuthenticationError":
        return f"the token in {TOKEN_ENV} was refused: create a new one at https://modelscope.cn/my/myaccesstoken"
    return (f"check the network, that the token in {TOKEN_ENV} is valid with write access, and that you "
            "own `upload.repo_id`; a rerun sends only what the hub does not have yet")


def upload_bundle(
    bundle_dir: Path,
    repo_id: str,
    visibility: str = "public",
    commit_message: str = "Upload Kolors style LoRA bundle",
    cache_file: Path | None = None,
) -> dict:
    """Create the model repo if needed and push the bundle folder; return {repo_id, url}.

    `cache_file` keeps the client's resume record (which files are committed) outside the bundle:
    by default the client writes `.ms_upload_cache` into the uploaded folder, which would change
    the sealed bundle. Without it nothing is cached and every upload sends the whole folder.
    Hub failures become a UserError naming the repo id, with the token scrubbed out and the
    original exception not chained (its traceback could carry request details).
    """
    from modelscope.hub.api import HubApi  # heavy import; only the upload step needs it

    bundle_dir = Path(bundle_dir)
    _check_upload_args(bundle_dir, repo_id, visibility)
    token = modelscope_token()
    try:
        with _client_errors() as logged:
            api = HubApi(token=token)
            api.login(token)
            api.create_repo(repo_id, visibility=visibility, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(bundle_dir), commit_message=commit_message,
                              use_cache=cache_file is not None, tracker_path=cache_file)
        endpoint = str(api.endpoint).rstrip("/")
    except Exception as exc:  # noqa: BLE001 - every hub failure is reported the same way
        first = next((e for e in logged.errors if type(e).__name__ != type(exc).__name__), None)
        detail = f"{type(exc).__name__}: {exc}" + (f"; first: {type(first).__name__}: {first}" if first else "")
        failure = UserError(f"Upload of {bundle_dir} to ModelScope repo {repo_id} failed "
                            f"({_scrub(detail, token)}); {_failure_hint([exc, *logged.errors])}. Then rerun.")
    else:
        return {"repo_id": repo_id, "url": f"{endpoint}/models/{repo_id}", "visibility": visibility}
    raise failure from None
