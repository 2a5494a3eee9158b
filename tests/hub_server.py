"""A small Hub-compatible HTTP server for tests: the subset of the Hugging Face Hub API that
`huggingface_hub` uses to create a repo, upload a folder in one commit (regular and LFS files), read repo
info and trees, and resolve and download files. In memory, on 127.0.0.1, in a thread.

It rejects what the real Hub rejects and we rely on: a missing or unknown token on writes (401), a missing
repo or revision (404 with the Hub's error codes), an existing repo on create (409), a commit naming LFS
objects that were never uploaded (400). `fail_uploads = True` makes every LFS upload fail (an interrupted
upload), and no commit happens.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt")


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, tuple[bytes, bool]]] = field(default_factory=dict)  # sha -> path -> (data, lfs)


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.fail_uploads = False
        self.commits_made = 0
        self.lock = threading.Lock()


def _sha1(*parts: bytes) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server_version = "hfcompress-test-hub"
    state: HubState

    def log_message(self, format, *args):  # quiet
        pass

    # --- helpers -------------------------------------------------------------------------------------
    def _send(self, status: int, body=None, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if raw is None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return self.state.tokens.get(auth[len("Bearer ") :]) if auth.startswith("Bearer ") else None

    def _require_user(self) -> str | None:
        user = self._user()
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
        return user

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and user is None):
            self._error(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
            return None
        if write and user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str | None:
        revision = unquote(revision)
        sha = repo.branches.get(revision) or (revision if revision in repo.commits else None)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # --- routing -------------------------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if self._user() is None and self.headers.get("Authorization"):
            return self._error(401, "Invalid credentials in Authorization header")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            repo = self._repo(repo_id)
            if repo is None:
                return None
            rest = parts[4:]
            if not rest or rest[0] == "revision":
                sha = self._commit_of(repo, rest[1] if len(rest) > 1 else "main")
                if sha:
                    files = repo.commits[sha]
                    info = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                            "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [], "downloads": 0}  # fmt: skip
                    self._send(200, info)
                return None
            if rest[0] == "tree":
                sha = self._commit_of(repo, rest[1] if len(rest) > 1 else "main")
                if sha:
                    self._send(200, [self._tree_entry(p, *v) for p, v in sorted(repo.commits[sha].items())])
                return None
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, path = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self._repo(repo_id)
            if repo is None:
                return None
            sha = self._commit_of(repo, revision)
            if sha is None:
                return None
            entry = repo.commits[sha].get(path)
            if entry is None:
                return self._error(404, f"Entry not found: {path}", "EntryNotFound")
            data, lfs = entry
            etag = hashlib.sha256(data).hexdigest() if lfs else _sha1(b"blob %d\0" % len(data), data)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            if lfs:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
            return self._send(200, headers=headers, raw=data)
        return self._error(404, f"no route for GET {url.path}")

    def _tree_entry(self, path: str, data: bytes, lfs: bool) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": _sha1(b"blob %d\0" % len(data), data)}
        if lfs:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def do_POST(self):
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        body = self._body()
        if parts == ["api", "repos", "create"]:
            return self._create(json.loads(body))
        if parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body)["content"])
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit", "branch"):
            repo_id = "/".join(parts[2:4])
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return None
            if parts[4] == "branch":
                with self.state.lock:
                    if parts[5] in repo.branches:
                        return self._error(409, f"Branch {parts[5]} already exists")
                    repo.branches[parts[5]] = repo.branches["main"]
                return self._send(200, {})
            if self._commit_of(repo, parts[5]) is None:
                return None
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                          "shouldIgnore": False} for f in files]  # fmt: skip
                return self._send(200, {"files": modes, "commitOid": repo.branches.get(parts[5])})
            return self._commit(repo_id, repo, parts[5], body)
        if url.path.endswith(".git/info/lfs/objects/batch"):
            repo_id = url.path.strip("/")[: -len(".git/info/lfs/objects/batch")]
            repo = self._repo(unquote(repo_id), write=True)
            if repo is None:
                return None
            request = json.loads(body)
            host = f"http://{self.headers['Host']}"
            objects = []
            for obj in request["objects"]:
                item = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.state.lfs:
                    item["actions"] = {"upload": {"href": f"{host}/lfs-upload/{obj['oid']}"}}
                objects.append(item)
            return self._send(
                200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
            )
        return self._error(404, f"no route for POST {url.path}")

    def do_PUT(self):
        url = urlparse(self.path)
        parts = url.path.strip("/").split("/")
        body = self._body()
        if len(parts) == 2 and parts[0] == "lfs-upload":
            if self.state.fail_uploads:
                return self._error(400, "upload interrupted (test server told to fail uploads)")
            if hashlib.sha256(body).hexdigest() != parts[1]:
                return self._error(400, "uploaded content does not match its oid")
            self.state.lfs[parts[1]] = body
            return self._send(200, {})
        return self._error(404, f"no route for PUT {url.path}")

    # --- actions -------------------------------------------------------------------------------------
    def _create(self, payload: dict):
        user = self._require_user()
        if user is None:
            return None
        namespace = payload.get("organization") or user
        if namespace != user:
            return self._error(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._error(409, "You already created this model repo", "RepoExists")
            private = payload.get("private", payload.get("visibility") == "private")
            initial = _sha1(repo_id.encode(), b"initial")
            self.state.repos[repo_id] = Repo(bool(private), {"main": initial}, {initial: {}})
        host = f"http://{self.headers['Host']}"
        return self._send(200, {"url": f"{host}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, content: str):
        """The README's front matter must be a YAML mapping, as the Hub requires."""
        import yaml

        match = content.startswith("---\n") and content.find("\n---", 4)
        if not match or match == -1:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            data = yaml.safe_load(content[4:match])
        except yaml.YAMLError as e:
            return self._error(400, f"Invalid YAML in README.md: {e}")
        if not isinstance(data, dict):
            return self._error(400, "README.md metadata must be a YAML mapping")
        return self._send(200, {"errors": [], "warnings": []})

    def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            return self._error(400, "commit payload has no header")
        with self.state.lock:
            parent = repo.branches[unquote(revision)]
            files = dict(repo.commits[parent])
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = (base64.b64decode(value["content"]), False)
                elif line["key"] == "lfsFile":
                    data = self.state.lfs.get(value["oid"])
                    if data is None:
                        return self._error(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = (data, True)
                elif line["key"] in ("deletedFile", "deletedFolder"):
                    prefix = value["path"].rstrip("/")
                    files = {p: v for p, v in files.items() if p != prefix and not p.startswith(prefix + "/")}
            sha = _sha1(parent.encode(), json.dumps(header).encode(), str(time.time_ns()).encode())
            repo.commits[sha] = files
            repo.branches[unquote(revision)] = sha
            self.state.commits_made += 1
        host = f"http://{self.headers['Host']}"
        return self._send(200, {"commitUrl": f"{host}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True})


class HubServer:
    """Start with `HubServer(tokens={"token": "user"})`; `.url` is the endpoint; `.close()` stops it."""

    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
