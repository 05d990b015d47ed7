"""A loopback server speaking the Hugging Face Hub's download routes, for pull tests.

It serves model folders as repositories so that huggingface_hub's real code
path runs against it (set ``HF_ENDPOINT`` to :attr:`FakeHub.url`):

- ``GET /api/models/{repo}[/revision/{rev}]`` — repository info with every
  file's size, git blob id and (for weights) LFS sha256; a repository may
  have branches besides ``main`` (EXL2 repositories publish one per bpw);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` — the file, with the hub's
  ``X-Repo-Commit`` and ``ETag`` headers and ``Range`` support.

Knobs for tests: ``corrupt`` (paths served with one byte flipped while the
metadata keeps the true checksum), ``bytes_per_second`` (throttle, so a pull
can be killed mid-file), and ``requests`` (what was asked, Range included).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".gguf")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.branches: dict[tuple[str, str], Path] = {}
        self.corrupt: set[str] = set()
        self.bytes_per_second: float | None = None
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub.handle(self, body=True)

            def do_HEAD(self) -> None:
                hub.handle(self, body=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo: str, folder: Path, *, revision: str = "main") -> None:
        """Serve ``folder`` as ``repo`` (at branch ``revision``; ``main`` is also the default)."""
        if revision == "main":
            self.repos[repo] = folder
        else:
            self.repos.setdefault(repo, folder)
            self.branches[(repo, revision)] = folder

    def _at(self, repo: str, revision: str) -> tuple[Path, str] | None:
        """The folder and commit a revision (branch name or commit) of ``repo`` names, or None."""
        if revision in ("", "main", COMMIT):
            return self.repos[repo], COMMIT
        for (name, branch), folder in self.branches.items():
            commit = hashlib.sha1(branch.encode(), usedforsecurity=False).hexdigest()
            if name == repo and revision in (branch, commit):
                return folder, commit
        return None

    # ------------------------------------------------------------ routes

    def handle(self, request: http.server.BaseHTTPRequestHandler, *, body: bool) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Range")))
        if path.startswith("/api/models/"):
            self.model_info(request, path[len("/api/models/"):])
            return
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            self.resolve(request, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body=body)
            return
        self.error(request, 404, "EntryNotFound")

    def model_info(self, request, rest: str) -> None:
        repo, _, revision = rest.partition("/revision/")
        if repo not in self.repos:
            self.error(request, 404, "RepoNotFound")
            return
        found = self._at(repo, revision)
        if found is None:
            self.error(request, 404, "RevisionNotFound")
            return
        siblings = []
        folder, commit = found
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = file.read_bytes()
            name = str(file.relative_to(folder))
            sibling = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if name.endswith(LFS_SUFFIXES):
                sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sibling)
        payload = json.dumps({"id": repo, "modelId": repo, "sha": commit, "private": False, "siblings": siblings})
        self.send(request, 200, payload.encode(), {"Content-Type": "application/json"}, body=True)

    def resolve(self, request, repo: str, revision: str, name: str, *, body: bool) -> None:
        if repo not in self.repos:
            self.error(request, 404, "RepoNotFound")
            return
        found = self._at(repo, revision)
        if found is None:
            self.error(request, 404, "RevisionNotFound")
            return
        folder, commit = found
        file = folder / name
        if not file.is_file():
            self.error(request, 404, "EntryNotFound")
            return
        data = file.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_id(data)
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, start = 200, 0
        byte_range = request.headers.get("Range")
        if byte_range and byte_range.startswith("bytes="):
            start = int(byte_range[6:].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send(request, status, data[start:], headers, body=body)

    def error(self, request, status: int, code: str) -> None:
        payload = json.dumps({"error": code}).encode()
        self.send(request, status, payload, {"X-Error-Code": code, "Content-Type": "application/json"}, body=True)

    def send(self, request, status: int, data: bytes, headers: dict[str, str], *, body: bool) -> None:
        try:
            request.send_response(status)
            for key, value in headers.items():
                request.send_header(key, value)
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            if not body or request.command == "HEAD":
                return
            if self.bytes_per_second is None:
                request.wfile.write(data)
                return
            chunk = max(1, int(self.bytes_per_second / 20))
            for offset in range(0, len(data), chunk):
                request.wfile.write(data[offset:offset + chunk])
                request.wfile.flush()
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
