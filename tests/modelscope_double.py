"""A local double of the ModelScope hub endpoints that modelscope 1.40.2's HubApi (through the
modelscope_hub 0.5.1 package it installs) calls for login, create_repo and upload_folder.

Paths, request bodies, status codes and JSON shapes follow the client's source, cited per handler
(modelscope_hub/_legacy_api.py, _openapi.py, api.py, errors.py, _upload.py). The real client is
pointed here with MODELSCOPE_ENDPOINT. A repo keeps each committed file's bytes, so a test can
compare them with the bundle; a PUT can be cut off mid-body to act out a dropped connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# errors._BUSINESS_CODE_MAP: the codes the client maps to AuthenticationError / AlreadyExistsError.
INVALID_TOKEN_CODE = 10010103009  # "served with HTTP 400 by POST /api/v1/login"
MODEL_EXISTS_CODE = 10010101001


@dataclass
class HubState:
    """What the hub knows: tokens -> (user, namespaces it may write), repos -> {path: bytes}."""

    tokens: dict[str, tuple[str, set[str]]]
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    commits: list[tuple[str, list[str]]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # "METHOD path", in arrival order
    seen_headers: list[str] = field(default_factory=list)  # every header value, for token checks
    drop_puts: int = 0  # cut off this many next blob PUTs half-way through their body
    lock: threading.Lock = field(default_factory=threading.Lock)


def _legacy(data: object, status: int = 200, code: int = 200, message: str = "success") -> tuple[int, dict]:
    """The legacy /api/v1 envelope: _legacy_api._json_data reads body["Data"]; errors.
    _extract_payload reads "Message" and _business_code "Code"."""
    return status, {"Code": code, "Data": data, "Message": message, "Success": status < 400,
                    "RequestId": "double-request"}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep pytest output quiet
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    def _send(self, status: int, body: dict | None, cookies: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for name, value in (cookies or {}).items():
            self.send_header("Set-Cookie", f"{name}={value}; Path=/")
        self.end_headers()
        self.wfile.write(raw)

    def _json(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _caller(self) -> tuple[str, set[str]] | None:
        """LegacyClient._headers sends `Authorization: Bearer <token>` (and the m_session_id
        cookie, _ensure_session_auth); the double authenticates by the Bearer header."""
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        return self.state.tokens.get(token)

    def _record(self) -> str:
        path = urlsplit(self.path).path
        with self.state.lock:
            self.state.requests.append(f"{self.command} {path}")
            self.state.seen_headers.extend(str(v) for v in self.headers.values())
        return path

    def do_GET(self) -> None:
        path = self._record()
        if path == "/openapi/v1/users/me":
            self._send(*self._whoami())
        elif path.startswith("/api/v1/models/"):
            self._send(*self._repo_info(path.removeprefix("/api/v1/models/")))
        else:
            self._send(404, {"Code": 404, "Message": f"no route {path}"})

    def do_POST(self) -> None:
        path = self._record()
        body = self._json()
        if path == "/api/v1/login":
            self._login(body)
            return
        if path == "/api/v1/models":
            self._send(*self._create_model(body))
        elif path.startswith("/api/v1/repos/models/") and path.endswith("/info/lfs/objects/batch"):
            repo = path.removeprefix("/api/v1/repos/models/").removesuffix("/info/lfs/objects/batch")
            self._send(*self._lfs_batch(repo, body))
        elif path.startswith("/api/v1/repos/models/") and "/commit/" in path:
            repo, _, revision = path.removeprefix("/api/v1/repos/models/").rpartition("/commit/")
            self._send(*self._commit(repo, revision, body))
        else:
            self._send(404, {"Code": 404, "Message": f"no route {path}"})

    def do_PUT(self) -> None:
        path = self._record()
        self._put_blob(path)

    # -- handlers ---------------------------------------------------------------------------

    def _login(self, body: dict) -> None:
        """_legacy_api.LegacyClient.login: POST /api/v1/login {"AccessToken": token}; the client
        reads Data.AccessToken (a git token), Username, Email and saves the response cookies."""
        user = self.state.tokens.get(body.get("AccessToken", ""))
        if user is None:
            self._send(*_legacy(None, 400, INVALID_TOKEN_CODE, "AccessToken is invalid or expired"))
            return
        status, payload = _legacy({"AccessToken": f"git-{user[0]}", "Username": user[0],
                                   "Email": f"{user[0]}@example.com"})
        self._send(status, payload, cookies={"m_session_id": f"session-{user[0]}"})

    def _whoami(self) -> tuple[int, dict]:
        """_openapi.OpenAPIClient.get_current_user: GET /openapi/v1/users/me, the OpenAPI
        {"success", "data"} envelope (_decode unwraps "data"); HubApi.login ends with whoami()."""
        user = self._caller()
        if user is None:
            return 401, {"success": False, "code": "Unauthorized", "message": "Unauthorized"}
        return 200, {"success": True, "data": {"username": user[0], "Username": user[0]}}

    def _repo_info(self, repo: str) -> tuple[int, dict]:
        """_legacy_api.get_repo_info: GET /api/v1/models/{repo_id}."""
        if repo not in self.state.repos:
            return _legacy(None, 404, 404, f"model {repo} not found")
        owner, name = repo.split("/", 1)
        return _legacy({"Path": owner, "Name": name, "Visibility": 5})

    def _create_model(self, body: dict) -> tuple[int, dict]:
        """_legacy_api.create_repo: POST /api/v1/models {"Path": owner, "Name": name, ...}. An
        existing repo answers Code 10010101001 (AlreadyExistsError, which create_repo(exist_ok=True)
        swallows); a namespace the token may not write answers 403 (PermissionDeniedError)."""
        user = self._caller()
        repo = f"{body.get('Path')}/{body.get('Name')}"
        if user is None:
            return _legacy(None, 401, 401, "Unauthorized: login required")
        if repo in self.state.repos:
            return _legacy(None, 400, MODEL_EXISTS_CODE, f"model {repo} already exists")
        if body.get("Path") not in user[1]:
            return _legacy(None, 403, 403, f"no permission to create a model under {body.get('Path')}")
        self.state.repos[repo] = {}
        return _legacy({"Path": body["Path"], "Name": body["Name"]})

    def _may_write(self, repo: str) -> tuple[int, dict] | None:
        user = self._caller()
        if user is None:
            return _legacy(None, 401, 401, "Unauthorized: login required")
        if repo not in self.state.repos:
            return _legacy(None, 404, 404, f"model {repo} not found")
        if repo.split("/", 1)[0] not in user[1]:
            return _legacy(None, 403, 403, f"no write permission on {repo}")
        return None

    def _lfs_batch(self, repo: str, body: dict) -> tuple[int, dict]:
        """_legacy_api.validate_blobs: POST .../info/lfs/objects/batch {"operation": "upload",
        "objects": [{"oid", "size"}]}; an object listed with actions.upload.href needs a PUT
        there, one left out already exists (git-lfs batch API shape; the client reads either
        top-level or Data-wrapped "objects")."""
        refused = self._may_write(repo)
        if refused:
            return refused
        base = f"http://{self.headers['Host']}"
        needed = [{"oid": o["oid"], "size": o["size"],
                   "actions": {"upload": {"href": f"{base}/lfs-upload/{repo}/{o['oid']}"}}}
                  for o in body.get("objects", []) if o["oid"] not in self.state.blobs]
        return 200, {"transfer": "basic", "objects": needed}

    def _put_blob(self, path: str) -> None:
        """_legacy_api.upload_blob: PUT {href} with the raw bytes and Content-Length; any status
        below 400 is success (errors.raise_for_status). The double checks the sha256 (oid)."""
        if not path.startswith("/lfs-upload/"):
            self._send(404, {"Code": 404, "Message": f"no route {path}"})
            return
        repo, _, oid = path.removeprefix("/lfs-upload/").rpartition("/")
        length = int(self.headers.get("Content-Length") or 0)
        with self.state.lock:
            drop = self.state.drop_puts > 0
            self.state.drop_puts -= drop
        if drop:  # read half the body, then close without answering: a dropped connection
            self.rfile.read(length // 2)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        data = self.rfile.read(length)
        if self._may_write(repo) or hashlib.sha256(data).hexdigest() != oid:
            self._send(*(self._may_write(repo) or _legacy(None, 400, 400, "sha256 mismatch")))
            return
        self.state.blobs[oid] = data
        self._send(200, {})

    def _commit(self, repo: str, revision: str, body: dict) -> tuple[int, dict]:
        """_legacy_api.create_commit: POST /api/v1/repos/models/{repo}/commit/{revision}
        {"commit_message", "actions": [{"action", "path", "type": "normal"|"lfs", "size",
        "sha256", "content" (base64), "encoding"}]} (_upload._build_operation); the client
        treats "Success": false as a rejected commit."""
        refused = self._may_write(repo)
        if refused:
            return refused
        files = dict(self.state.repos[repo])
        for action in body.get("actions", []):
            if action["type"] == "lfs":
                if action["sha256"] not in self.state.blobs:
                    return _legacy(None, 400, 400, f"lfs object {action['sha256']} not uploaded")
                files[action["path"]] = self.state.blobs[action["sha256"]]
            else:
                files[action["path"]] = base64.b64decode(action["content"])
        self.state.repos[repo] = files
        self.state.commits.append((revision, [a["path"] for a in body.get("actions", [])]))
        return _legacy({"CommitId": hashlib.sha1(repr(sorted(files)).encode()).hexdigest()})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


def start_hub(state: HubState) -> tuple[_Server, str]:
    """Serve `state` on a free local port in a daemon thread; return the server and endpoint."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = state
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
