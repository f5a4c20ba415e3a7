"""The upload, proven against a local double of the ModelScope hub (modelscope_double.py), driven
by the real modelscope 1.40.2 client in a subprocess: bundles arrive byte-identical, a second
upload is harmless, a dropped connection fails clearly and a rerun completes, the token is in no
output or file, and a repo the token may not write is named as such."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kolors_story.run_files import LORA_WEIGHT_NAME
from modelscope_double import HubState, start_hub

TOKEN = "ms-fake-0123456789abcdef-secret"
LORA_MB = 40  # a full-size Kolors LoRA is tens of MB: above the client's 64 KiB LFS threshold

UPLOAD = """
import sys
from pathlib import Path
from kolors_story.errors import UserError
from kolors_story.outputs.hub_upload import upload_bundle
cache = Path(sys.argv[3]) if len(sys.argv) > 3 else None
try:
    print("RESULT:", upload_bundle(sys.argv[1], sys.argv[2], cache_file=cache))
except UserError as err:
    print("USERERROR:", err)
    print("CAUSE:", repr(err.__cause__), "CONTEXT:", repr(err.__context__))
    sys.exit(3)
"""


def make_bundle(root: Path) -> Path:
    """A bundle laid out as build_bundle writes it, with a LoRA file of full size."""
    bundle = root / "bundle"
    (bundle / "panels").mkdir(parents=True)
    (bundle / LORA_WEIGHT_NAME).write_bytes(os.urandom(LORA_MB * 2**20))
    (bundle / "README.md").write_text("---\nlicense: apache-2.0\n---\n# 水墨 LoRA\n", encoding="utf-8")
    (bundle / "prompts.json").write_text('{"scenes": []}', encoding="utf-8")
    (bundle / "story.png").write_bytes(os.urandom(200_000))
    (bundle / "panels" / "s1.png").write_bytes(os.urandom(90_000))
    (bundle / "panels" / "s2.png").write_bytes(os.urandom(1_000))
    return bundle


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def hub():
    state = HubState(tokens={TOKEN: ("alice", {"alice"}), "other-token": ("bob", {"bob"})})
    server, endpoint = start_hub(state)
    yield state, endpoint
    server.shutdown()
    server.server_close()


def upload(tmp: Path, endpoint: str, bundle: Path, repo: str, cache: Path | None = None,
           token: str = TOKEN) -> subprocess.CompletedProcess:
    """The real client in a fresh process; its own config and cache kept under `tmp`."""
    env = dict(os.environ, MODELSCOPE_API_TOKEN=token, MODELSCOPE_ENDPOINT=endpoint,
               MODELSCOPE_HOME=str(tmp / "mshome"), MODELSCOPE_CACHE=str(tmp / "mscache"),
               MODELSCOPE_UPLOAD_BLOB_MAX_ATTEMPTS="2")  # default 5, backing off 1+2+4+8 s
    args = [sys.executable, "-c", UPLOAD, str(bundle), repo] + ([str(cache)] if cache else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180)
    assert_no_token(tmp, proc.stdout + proc.stderr)
    return proc


def assert_no_token(tmp: Path, output: str) -> None:
    """Not in stdout, stderr (logs, tracebacks) or any file the upload or the client wrote."""
    assert TOKEN not in output
    for path in tmp.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_bundle_arrives_byte_identical_and_reupload_is_harmless(tmp_path: Path, hub):
    state, endpoint = hub
    bundle = make_bundle(tmp_path)
    before = files_of(bundle)
    cache = tmp_path / ".upload_cache.json"
    first = upload(tmp_path, endpoint, bundle, "alice/kolors-ink", cache)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "RESULT:" in first.stdout and f"{endpoint}/models/alice/kolors-ink" in first.stdout
    assert state.repos["alice/kolors-ink"] == before
    # the LoRA took the large-file path: LFS batch, then a PUT of its bytes
    assert any(r.endswith("/info/lfs/objects/batch") for r in state.requests)
    assert any(r.startswith("PUT /lfs-upload/") for r in state.requests)
    assert files_of(bundle) == before  # nothing written into the (sealed) bundle folder
    assert cache.is_file()

    commits, puts = len(state.commits), sum(r.startswith("PUT") for r in state.requests)
    second = upload(tmp_path, endpoint, bundle, "alice/kolors-ink", cache)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (len(state.commits), sum(r.startswith("PUT") for r in state.requests)) == (commits, puts)
    # without a resume record everything is committed again; blobs the hub has are not re-sent
    third = upload(tmp_path, endpoint, bundle, "alice/kolors-ink")
    assert third.returncode == 0, third.stdout + third.stderr
    assert sum(r.startswith("PUT") for r in state.requests) == puts
    assert state.repos["alice/kolors-ink"] == before and files_of(bundle) == before


def test_dropped_connection_fails_clearly_and_rerun_completes(tmp_path: Path, hub):
    state, endpoint = hub
    bundle = make_bundle(tmp_path)
    cache = tmp_path / ".upload_cache.json"
    state.drop_puts = 1  # one drop: the client's own retry carries on
    ok = upload(tmp_path, endpoint, bundle, "alice/a", cache)
    assert ok.returncode == 0 and state.repos["alice/a"] == files_of(bundle), ok.stdout + ok.stderr

    state.drop_puts = 100  # every attempt dropped half-way: the upload fails
    bundle = make_bundle(tmp_path / "new")  # new blobs: the hub has none of them yet
    failed = upload(tmp_path, endpoint, bundle, "alice/b", cache)
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "alice/b" in failed.stdout and "rerun" in failed.stdout
    assert "CAUSE: None CONTEXT: None" in failed.stdout
    assert LORA_WEIGHT_NAME not in state.repos["alice/b"]
    assert "Connection" in failed.stdout or "connection" in failed.stdout

    state.drop_puts = 0
    rerun = upload(tmp_path, endpoint, bundle, "alice/b", cache)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert state.repos["alice/b"] == files_of(bundle)


def test_repo_the_token_may_not_write_is_named(tmp_path: Path, hub):
    state, endpoint = hub
    bundle = make_bundle(tmp_path)
    state.repos["bob/style"] = {}
    denied = upload(tmp_path, endpoint, bundle, "bob/style")
    assert denied.returncode == 3, denied.stdout + denied.stderr
    assert "bob/style" in denied.stdout and "may not write to this repo" in denied.stdout
    assert state.repos["bob/style"] == {}

    refused = upload(tmp_path, endpoint, bundle, "alice/x", token="ms-unknown-token")
    assert refused.returncode == 3 and "was refused" in refused.stdout, refused.stdout + refused.stderr
