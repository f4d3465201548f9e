"""A small Hugging Face Hub API server for tests, on 127.0.0.1 (standard library only).

It implements what `huggingface_hub` 2.x and `transformers` 5.x call to create a repo, upload files
through the classic (non-Xet) LFS flow and download them (see shared/design/transformers.md):

    POST /api/repos/create                           -> 200, or 409 when the repo exists
    POST /api/validate-yaml                          -> 200 (no errors)
    GET  /api/whoami-v2                              -> the user of the token
    GET  /api/models/{repo}[/revision/{rev}]         -> id, sha, siblings
    GET  /api/models/{repo}/tree/{rev}[/{path}]      -> the files (recursive)
    POST /api/models/{repo}/preupload/{rev}          -> uploadMode per file (lfs for *.safetensors)
    POST /{repo}.git/info/lfs/objects/batch          -> an upload href per LFS object not yet stored
    PUT  /lfs/{oid}                                  -> stores the object (sha256 checked)
    POST /api/models/{repo}/commit/{rev}             -> a new commit (ndjson: header, file, lfsFile, deletedFile)
    POST /api/models/{repo}/branch/{branch}          -> a new branch from startingPoint or main; 409 if it exists
    HEAD/GET /{repo}/resolve/{rev}/{path}            -> the file, with X-Repo-Commit, ETag, X-Linked-Etag/Size

Repos live in memory as a chain of commits (each a full snapshot {path: bytes}). A private repo answers 401
(as the Hub does) unless the request carries a known token; every write needs a known token. Errors carry
the `X-Error-Code` header huggingface_hub maps to its exception types. The body of every request is read,
even when the answer is an error, so HTTP keep-alive stays in step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pt filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    lfs_paths: set[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class HubState:
    """Repos, LFS objects, known tokens and a log of the requests (method, path) for the tests."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._counter = 0

    def new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, bytes], lfs: set[str]) -> str:
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}|{parent}|{message}|{self._counter}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, parent, message, dict(files), set(lfs) & set(files))
        return sha

    def file(self, repo_id: str, revision: str, path: str) -> bytes:
        """A file's content at a revision (for the tests' own checks)."""
        repo = self.repos[repo_id]
        commit = repo.resolve(revision)
        assert commit is not None, revision
        return commit.files[path]


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub
    server: HubServer

    # ------------------------------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        return self.server.state.tokens.get(token) if token else None

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        """The repo, or None after answering the error (missing repo, private without token, write without)."""
        repo = self.server.state.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and user is None):
            self._error(401 if user is None else 404, "RepoNotFound", "Repository not found")
            return None
        if write and user is None:
            self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            return None
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit | None:
        commit = repo.resolve(urllib.parse.unquote(revision))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _dispatch(self) -> None:
        body = self._body()  # always read, even for errors
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        with self.server.state.lock:
            self.server.state.requests.append((self.command, path))
        for method, pattern, handler in ROUTES:
            if method == self.command or (method == "GET" and self.command == "HEAD"):
                match = re.fullmatch(pattern, path)
                if match:
                    with self.server.state.lock:
                        handler(self, body, urllib.parse.parse_qs(url.query), *match.groups())
                    return
        self._error(404, "EntryNotFound", f"no route for {self.command} {path}")

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    # ------------------------------------------------------------------------------------------ endpoints

    def create_repo(self, body: bytes, query) -> None:
        user = self._user()
        if user is None:
            self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            return
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        state = self.server.state
        if repo_id in state.repos:
            self._json(409, {"error": "You already created this model repo", "url": self._url(repo_id)})
            return
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.branches["main"] = state.new_commit(repo, None, "initial commit", {".gitattributes": GITATTRIBUTES}, set())
        state.repos[repo_id] = repo
        self._json(200, {"url": self._url(repo_id), "name": repo_id, "id": repo_id})

    def validate_yaml(self, body: bytes, query) -> None:
        self._json(200, {"errors": [], "warnings": []})

    def whoami(self, body: bytes, query) -> None:
        user = self._user()
        if user is None:
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return
        role = {"role": "write", "displayName": "test"}
        auth = {"type": "access_token", "accessToken": role}
        self._json(200, {"type": "user", "name": user, "orgs": [], "auth": auth})

    def model_info(self, body: bytes, query, repo_id: str, revision: str | None) -> None:
        repo = self._repo(repo_id)
        commit = repo and self._commit(repo, revision or "main")
        if commit is None:
            return
        siblings = [{"rfilename": p} for p in sorted(commit.files)]
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": repo.private, "siblings": siblings,
             "tags": [], "downloads": 0, "likes": 0},
        )

    def tree(self, body: bytes, query, repo_id: str, revision: str, subpath: str | None) -> None:
        repo = self._repo(repo_id)
        commit = repo and self._commit(repo, revision)
        if commit is None:
            return
        prefix = (subpath.strip("/") + "/") if subpath else ""
        entries = []
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in commit.lfs_paths:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def preupload(self, body: bytes, query, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        files = json.loads(body)["files"]
        modes = [
            {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
             "shouldIgnore": False}
            for f in files
        ]
        self._json(200, {"files": modes, "commitOid": repo.branches.get("main")})

    def lfs_batch(self, body: bytes, query, repo_id: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.server.url}/lfs/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_put(self, body: bytes, query, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            self._error(400, "BadRequest", "sha256 mismatch")
            return
        self.server.state.lfs_objects[oid] = body
        self._send(200)

    def commit(self, body: bytes, query, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id, write=True)
        head = repo and self._commit(repo, revision)
        if head is None:
            return
        files, lfs, message = dict(head.files), set(head.lfs_paths), ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                lfs.discard(value["path"])
            elif key == "lfsFile":
                data = self.server.state.lfs_objects.get(value["oid"])
                if data is None:
                    self._error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                    return
                files[value["path"]] = data
                lfs.add(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                self._error(400, "BadRequest", f"unsupported commit operation {key}")
                return
        sha = self.server.state.new_commit(repo, head.sha, message, files, lfs)
        branch = urllib.parse.unquote(revision)
        repo.branches[branch if branch in repo.branches else "main"] = sha
        self._json(200, {"commitUrl": f"{self._url(repo_id)}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None, "success": True})

    def create_branch(self, body: bytes, query, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        branch = urllib.parse.unquote(branch)
        if branch in repo.branches:
            self._error(409, "Conflict", f"Reference already exists: refs/heads/{branch}")
            return
        start = self._commit(repo, (json.loads(body) if body else {}).get("startingPoint") or "main")
        if start is not None:
            repo.branches[branch] = start.sha
            self._json(200, {})

    def resolve(self, body: bytes, query, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        commit = repo and self._commit(repo, revision)
        if commit is None:
            return
        data = commit.files.get(path)
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.sha}
            self._json(404, {"error": "Entry not found"}, headers)
            return
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_sha1(data)}"',
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if path in commit.lfs_paths:
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
        start = _range_start(self.headers.get("Range"))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, data[start:], headers)
            return
        self._send(200, data, headers)

    def _url(self, repo_id: str) -> str:
        return f"{self.server.url}/{repo_id}"


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else 0


_REPO = r"([^/]+/[^/]+)"
ROUTES = [
    ("POST", r"/api/repos/create", HubHandler.create_repo),
    ("POST", r"/api/validate-yaml", HubHandler.validate_yaml),
    ("GET", r"/api/whoami-v2", HubHandler.whoami),
    ("GET", rf"/api/models/{_REPO}(?:/revision/(.+))?", HubHandler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/([^/]+)(/.*)?", HubHandler.tree),
    ("POST", rf"/api/models/{_REPO}/preupload/(.+)", HubHandler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(.+)", HubHandler.commit),
    ("POST", rf"/api/models/{_REPO}/branch/(.+)", HubHandler.create_branch),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", HubHandler.lfs_batch),
    ("PUT", r"/lfs/([0-9a-f]{64})", HubHandler.lfs_put),
    ("GET", rf"/{_REPO}/resolve/([^/]+)/(.+)", HubHandler.resolve),
]


class HubServer(ThreadingHTTPServer):
    """`with HubServer(tokens={"hf_token": "alice"}) as hub:` serves at `hub.url` from a daemon thread."""

    daemon_threads = True

    def __init__(self, tokens: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.state = HubState(tokens)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join()
