"""A Hub on loopback: serves local folders as model repos through the endpoints huggingface_hub's download code
reads (repo info, file tree, ``resolve``), so tests exercise diffusers' and huggingface_hub's own Hub code paths
offline. Point a process at it with ``HF_ENDPOINT``."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

#: The commit every served repo is at.
COMMIT = "0123456789abcdef0123456789abcdef01234567"

INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
TREE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class FakeHub:
    """``with FakeHub({"user/repo": folder}) as hub:`` serves the folders at ``hub.endpoint``; ``hub.requests``
    lists the paths asked for."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> list[str]:
        root = self.repos[repo_id]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for key, value in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _error(self, status: int, code: str, body: bool) -> None:
                message = json.dumps({"error": code}).encode()
                self._send(status, message, {"X-Error-Code": code, "Content-Type": "application/json"}, body)

            def _answer(self, body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append(path)
                for pattern, reply in ((INFO, self._info), (TREE, self._tree), (RESOLVE, self._resolve)):
                    match = pattern.match(path)
                    if match:
                        if match.group(1) not in hub.repos:
                            return self._error(404, "RepoNotFound", body)
                        return reply(match, body)
                self._error(404, "EntryNotFound", body)

            def _json(self, value, body: bool) -> None:
                self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

            def _info(self, match, body: bool) -> None:
                repo_id = match.group(1)
                self._json({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "private": False, "tags": [],
                            "siblings": [{"rfilename": name} for name in hub.files(repo_id)]}, body)

            def _tree(self, match, body: bool) -> None:
                repo_id, prefix = match.group(1), (match.group(3) or "").strip("/")
                root = hub.repos[repo_id]
                entries = []
                for name in hub.files(repo_id):
                    if prefix and not name.startswith(prefix + "/"):
                        continue
                    data = (root / name).read_bytes()
                    entries.append({"type": "file", "path": name, "size": len(data),
                                    "oid": hashlib.sha1(data).hexdigest()})
                self._json(entries, body)

            def _resolve(self, match, body: bool) -> None:
                repo_id, filename = match.group(1), match.group(3)
                file = hub.repos[repo_id] / filename
                if not file.is_file() or ".." in Path(filename).parts:
                    return self._error(404, "EntryNotFound", body)
                data = file.read_bytes()
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                self._send(200, data, {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Type": "application/octet-stream"},
                           body)

        return Handler
