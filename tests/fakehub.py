"""A stand-in for the Hugging Face Hub HTTP API, just enough for ``create_repo`` + ``upload_folder``.

Endpoints (as huggingface_hub 2.x calls them):
    POST /api/repos/create                              create a repo (409 when it exists)
    POST /api/validate-yaml                             README.md front matter must be a YAML mapping
    POST /api/{type}s/{namespace}/{name}/preupload/{rev} every file "regular" (no LFS / xet)
    POST /api/{type}s/{namespace}/{name}/commit/{rev}    NDJSON commit, files inline as base64
Received files are written under ``root/<type>s/<namespace>/<name>/``; every request is recorded
with its Authorization header. Any other request gets a 404 and is recorded too.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO_API = re.compile(r"^/api/(models|datasets)/([^/]+)/([^/]+)/(preupload|commit)/([^/?]+)")


class FakeHub:
    def __init__(self, root: Path, token: str):
        self.root = root
        self.token = token
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.created: list[dict] = []  # create_repo payloads
        self.commits: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def received_files(self, repo_type: str, repo_id: str) -> dict[str, bytes]:
        """Repo path -> bytes of every file committed to the repo."""
        repo = self.repo_dir(repo_type, repo_id)
        return {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*") if p.is_file()}


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
        self.reply(404, {"error": f"not served by the stand-in: GET {self.path}"})

    def do_POST(self):
        hub: FakeHub = self.server.hub
        hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path == "/api/repos/create":
            return self.create_repo(hub, json.loads(body))
        if self.path == "/api/validate-yaml":
            return self.validate_yaml(json.loads(body)["content"])
        match = REPO_API.match(self.path)
        if match is None:
            return self.reply(404, {"error": f"not served by the stand-in: POST {self.path}"})
        repo_type, namespace, name, action, _ = match.groups()
        repo = hub.repo_dir(repo_type[:-1], f"{namespace}/{name}")
        if not repo.is_dir():
            return self.reply(404, {"error": f"Repository not found: {namespace}/{name}"})
        if action == "preupload":
            files = json.loads(body)["files"]
            return self.reply(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
            ]})
        return self.commit(hub, repo, repo_type, f"{namespace}/{name}", body)

    def create_repo(self, hub: FakeHub, payload: dict) -> None:
        hub.created.append(payload)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{hub.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        repo = hub.repo_dir(repo_type, repo_id)
        if repo.is_dir():  # the Hub answers 409 with the existing repo's url
            return self.reply(409, {"error": "You already created this repo", "url": url})
        repo.mkdir(parents=True)
        self.reply(200, {"url": url})

    def validate_yaml(self, content: str) -> None:
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        metadata = yaml.safe_load(match.group(1)) if match else None
        if not isinstance(metadata, dict):
            return self.reply(400, {"errors": [{"message": "README.md front matter is not a YAML mapping"}]})
        self.reply(200, {"errors": [], "warnings": []})

    def commit(self, hub: FakeHub, repo: Path, repo_type: str, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, operations = lines[0], lines[1:]
        if header["key"] != "header":
            return self.reply(400, {"error": "commit payload must start with a header"})
        written = []
        for operation in operations:
            value = operation["value"]
            path = PurePosixPath(value["path"])
            if operation["key"] != "file" or value.get("encoding") != "base64":
                return self.reply(400, {"error": f"only inline base64 files are accepted: {operation['key']}"})
            if path.is_absolute() or ".." in path.parts:
                return self.reply(400, {"error": f"invalid path {path}"})
            target = repo / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(value["content"]))
            written.append(str(path))
        oid = hashlib.sha1(body).hexdigest()
        hub.commits.append({"repo_id": repo_id, "summary": header["value"]["summary"], "files": written})
        prefix = "" if repo_type == "models" else "datasets/"
        self.reply(200, {"commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})


@pytest.fixture
def fake_hub(tmp_path):
    """A running stand-in Hub on 127.0.0.1 (random port), writing into tmp_path/hub."""
    hub = FakeHub(tmp_path / "hub", token="hf_standin_" + hashlib.sha1(str(tmp_path).encode()).hexdigest())
    thread = threading.Thread(target=hub.server.serve_forever, daemon=True)
    thread.start()
    yield hub
    hub.server.shutdown()
    hub.server.server_close()
    thread.join()
