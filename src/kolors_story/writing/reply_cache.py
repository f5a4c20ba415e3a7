"""Language model replies cached by their request (backend, model, messages, settings), so an
unchanged outline never calls the model again, across runs and variants. One JSON file a reply,
`<sha256 of the request>.json` holding the request and the reply; written to a temporary file
and renamed (concurrent jobs see no entry or a whole one)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any


def request_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ReplyCache:
    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder else None  # None: no cache (every request asks)

    def _path(self, request: dict[str, Any]) -> Path:
        assert self.folder is not None
        return self.folder / f"{request_key(request)}.json"

    def get(self, request: dict[str, Any]) -> str | None:
        if self.folder is None or not self._path(request).is_file():
            return None
        try:
            entry = json.loads(self._path(request).read_text(encoding="utf-8"))
        except ValueError:
            return None  # a damaged entry: asked again and rewritten
        return entry["reply"] if entry.get("request") == request else None

    def put(self, request: dict[str, Any], reply: str) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(request)
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"request": request, "reply": reply}, ensure_ascii=False, indent=1) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
