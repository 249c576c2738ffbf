"""A stand-in for the Hugging Face Hub HTTP API, just enough for the pushes of cpia-hf (huggingface_hub 2.x).

Endpoints:
    GET  /api/whoami-v2                                 the token's user and role (401 for another token)
    POST /api/repos/create                              create a repo (409 when it exists)
    GET  /api/{type}s/{namespace}/{name}[/revision/{rev}] repo info with its files (siblings)
    GET  /api/{type}s/{namespace}/{name}/tree/{rev}      recursive listing: path, size, oid of each file
    POST /api/validate-yaml                             README.md front matter must be a YAML mapping
    POST /api/{type}s/{namespace}/{name}/preupload/{rev} every file "regular" (no LFS / xet), with the oid of
                                                        the file the repo holds at that path (git blob sha1)
    POST /api/{type}s/{namespace}/{name}/commit/{rev}    NDJSON commit, files inline as base64; a commit over
                                                        the Hub's per-commit limits is refused (413)
Received files are written under ``root/<type>s/<namespace>/<name>/``; every request is recorded with its
Authorization header, every preupload's paths and every commit's files too. ``faults`` makes chosen
requests fail (an HTTP status, or held open until released, as a push killed mid-commit sees it). Any
other request gets a 404 and is recorded too.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO_API = re.compile(r"^/api/(models|datasets)/([^/]+)/([^/]+)/(preupload|commit)/([^/?]+)")
REPO_GET = re.compile(r"^/api/(models|datasets)/([^/]+)/([^/?]+)(?:/revision/[^/?]+)?/?(?:\?.*)?$")
TREE_GET = re.compile(r"^/api/(models|datasets)/([^/]+)/([^/]+)/tree/([^/?]+)(?:/[^?]*)?(?:\?.*)?$")
# The Hub's per-commit limits for commits made over HTTP (docs: repositories-recommendations): files per
# commit, and the request body (files inline, base64-encoded).
COMMIT_MAX_FILES = 100
COMMIT_MAX_BODY = 100 * 2**20


@dataclass
class Fault:
    """Requests matching `pattern` ("METHOD /path" regex) fail with `status`, after `after` of them passed;
    `hold` instead keeps the request open (a commit in flight when the pusher dies) until released."""
    pattern: str
    status: int = 500
    after: int = 0
    hold: bool = False
    seen: int = 0


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self, root: Path, token: str, user: str = "someone", role: str = "write"):
        self.root = root
        self.token = token
        self.user = user
        self.role = role  # the token's role whoami reports: write, read
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Authorization header
        self.created: list[dict] = []  # create_repo payloads
        self.preuploaded: list[str] = []  # paths asked about, every preupload
        self.commits: list[dict] = []
        self.faults: list[Fault] = []
        self.held = threading.Event()  # set when a request is being held
        self.release = threading.Event()  # set to let held requests go (they fail with 503)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def received_files(self, repo_type: str, repo_id: str) -> dict[str, bytes]:
        """Repo path -> bytes of every file committed to the repo."""
        repo = self.repo_dir(repo_type, repo_id)
        return {p.relative_to(repo).as_posix(): p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    def committed_paths(self) -> list[str]:
        return [path for commit in self.commits for path in commit["files"]]

    def fault_for(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if re.search(fault.pattern, f"{method} {path}"):
                fault.seen += 1
                if fault.seen > fault.after:
                    return fault
        return None


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def reply(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
        except (BrokenPipeError, ConnectionResetError):
            return
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client is gone (a killed push)
            pass

    def start(self, method: str) -> tuple[FakeHub, bytes] | None:
        """Record the request; answer it here (auth, faults) and return None, or return (hub, body)."""
        hub: FakeHub = self.server.hub
        hub.requests.append((method, self.path, self.headers.get("Authorization")))
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Authorization") != f"Bearer {hub.token}":
            self.reply(401, {"error": "Invalid credentials in Authorization header"})
            return None
        fault = hub.fault_for(method, self.path)
        if fault is not None and fault.hold:
            hub.held.set()
            hub.release.wait(timeout=120)
            fault = Fault(fault.pattern, 503)
        if fault is not None:
            self.reply(fault.status, {"error": f"stand-in fault {fault.status}"}, {"Retry-After": "0"})
            return None
        return hub, body

    def do_GET(self):
        started = self.start("GET")
        if started is None:
            return
        hub, _ = started
        if self.path == "/api/whoami-v2":
            return self.reply(200, {"type": "user", "name": hub.user, "orgs": [],
                                    "auth": {"type": "access_token", "accessToken": {"role": hub.role}}})
        for pattern, answer in ((TREE_GET, self.tree), (REPO_GET, self.repo_info)):
            match = pattern.match(self.path)
            if match:
                repo_type, namespace, name = match.groups()[:3]
                repo = hub.repo_dir(repo_type[:-1], f"{namespace}/{name}")
                if not repo.is_dir():
                    return self.reply(404, {"error": f"Repository not found: {namespace}/{name}"},
                                      {"X-Error-Code": "RepoNotFound"})
                return answer(repo, f"{namespace}/{name}")
        self.reply(404, {"error": f"not served by the stand-in: GET {self.path}"})

    def tree(self, repo: Path, repo_id: str) -> None:
        files = sorted(p for p in repo.rglob("*") if p.is_file())
        self.reply(200, [{"type": "file", "path": p.relative_to(repo).as_posix(), "size": p.stat().st_size,
                          "oid": git_blob_oid(p.read_bytes())} for p in files])

    def repo_info(self, repo: Path, repo_id: str) -> None:
        files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
        sha = hashlib.sha1("\n".join(files).encode()).hexdigest()
        self.reply(200, {"id": repo_id, "sha": sha, "private": True,
                         "siblings": [{"rfilename": f} for f in files]})

    def do_POST(self):
        started = self.start("POST")
        if started is None:
            return
        hub, body = started
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
            hub.preuploaded += [f["path"] for f in files]
            return self.reply(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_oid((repo / f["path"]).read_bytes()) if (repo / f["path"]).is_file() else None}
                for f in files
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
        if len(operations) > COMMIT_MAX_FILES or len(body) > COMMIT_MAX_BODY:
            return self.reply(413, {"error": f"commit too large: {len(operations)} files, {len(body)} bytes"})
        written = {}
        for operation in operations:
            value = operation["value"]
            path = PurePosixPath(value["path"])
            if operation["key"] != "file" or value.get("encoding") != "base64":
                return self.reply(400, {"error": f"only inline base64 files are accepted: {operation['key']}"})
            if path.is_absolute() or ".." in path.parts or path.parts[0] in (".git", ".cache"):
                return self.reply(400, {"error": f"invalid path {path}"})
            written[str(path)] = base64.b64decode(value["content"])
        for path, content in written.items():  # a commit is all or nothing
            target = repo / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        oid = hashlib.sha1(body).hexdigest()
        hub.commits.append({"repo_id": repo_id, "summary": header["value"]["summary"], "files": list(written)})
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
    hub.release.set()
    hub.server.shutdown()
    hub.server.server_close()
    thread.join()
