"""A fake Hugging Face hub on loopback (for HF_ENDPOINT): serves the files of local folders as model repositories,
with the headers huggingface_hub reads, and can answer a request with a hub error instead."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

SHA = "0" * 40


@dataclass
class HubError:
    """What the fake hub answers instead of a file: an HTTP status with the hub's X-Error-* headers."""

    status: int
    code: str = ""
    message: str = ""


@dataclass
class FakeHubServer:
    """repos: hub repository ('owner/name') -> folder of its files. `error`: answered to every request when set."""

    repos: dict[str, Path]
    error: HubError | None = None
    cut: int | None = None
    """When set, a file download sends only this many bytes of the body, then drops the connection."""
    then: HubError | None = None
    stall: float = 0.0
    """Seconds a cut download waits after its `cut` bytes, before dropping the connection (time to interrupt it)."""
    """What `error` becomes once a download has been cut (a hub that stays away: no retry gets further)."""
    pause: float = 0.0
    """Seconds each file download waits before its body (time to interrupt a download)."""
    xet: bool = False
    """When set, weight files (.safetensors) are announced as Xet-backed (X-Xet-Hash), as the real hub does; no Xet
    server is behind it: its token route is not found, so a download that went the Xet way fails."""
    cdn_link_life: float | None = None
    """When set, weight files (.safetensors) are served as the hub serves LFS and Xet files: /resolve/ answers a
    redirect to another host (a CDN; here `localhost`) whose signed link is refused this many seconds later."""
    requests: list[str] = field(default_factory=list)
    """'METHOD /path' of each request, then ' Range: ...' when it asked for part of a file."""
    url: str = ""


def _handler(hub: FakeHubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            asked = self.headers.get("Range")
            hub.requests.append(f"{self.command} {self.path}" + (f" Range: {asked}" if asked else ""))
            if hub.error is not None:
                headers = {"X-Error-Code": hub.error.code, "X-Error-Message": hub.error.message}
                self._send(hub.error.status, b"{}", headers)
                return
            path, _, query = self.path.partition("?")
            if path.startswith("/cdn/"):  # a signed CDN link: refused once it has expired
                if time.time() > float(query.removeprefix("expires=")):
                    self._send(403, b"Request has expired", {})
                    return
                repo, file = path.removeprefix("/cdn/").rsplit("/", 1)
                self._file(hub.repos[repo] / file, body)
                return
            for repo, folder in hub.repos.items():
                files = sorted(p.name for p in folder.iterdir() if p.is_file())
                if path.startswith(f"/api/models/{repo}/tree/"):
                    tree = [{"type": "file", "path": f, "size": (folder / f).stat().st_size, "oid": SHA} for f in files]
                    self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                    return
                if path.startswith(f"/api/models/{repo}/"):
                    info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                    return
                if path.startswith(f"/{repo}/resolve/"):
                    file = folder / path.removeprefix(f"/{repo}/resolve/").split("/", 1)[1]
                    if hub.cdn_link_life is not None and file.suffix == ".safetensors" and file.is_file():
                        self._redirect(repo, file)
                    else:
                        self._file(file, body)
                    return
            self._send(404, b"", {"X-Error-Code": "RepoNotFound"})

        def _file(self, file: Path, body: bool) -> None:
            """A file download (GET) or its metadata (HEAD); from the offset of a `Range: bytes=N-` header as the
            hub's CDN does (206); only `hub.cut` bytes of it when that is set."""
            if not file.is_file():
                self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
                return
            if body:
                time.sleep(hub.pause)
            data = file.read_bytes()
            headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            if hub.xet and file.suffix == ".safetensors":
                headers |= {"X-Xet-Hash": "f" * 64, "X-Xet-Refresh-Route": f"{hub.url}/api/xet-token-unavailable"}
            status, start = 200, 0
            if body and (asked := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))):
                status, start = 206, int(asked[1])
                if start >= len(data):  # past the end: the hub's CDN refuses the range
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    return
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            rest = data[start:]
            sent = rest if hub.cut is None else rest[: hub.cut]
            self._send(status, sent if body else b"", headers | {"Content-Type": "application/octet-stream"}, len(rest))
            if body and hub.cut is not None:
                self.wfile.flush()
                time.sleep(hub.stall)
                self.close_connection = True
                hub.error = hub.then

        def _redirect(self, repo: str, file: Path) -> None:
            """The hub's answer for an LFS file: its metadata, and a link to the CDN that expires."""
            assert hub.cdn_link_life is not None
            expires = time.time() + hub.cdn_link_life
            location = f"{hub.url.replace('127.0.0.1', 'localhost')}/cdn/{repo}/{file.name}?expires={expires}"
            sha = hashlib.sha256(file.read_bytes()).hexdigest()
            headers = {"X-Repo-Commit": SHA, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(file.stat().st_size)}
            self._send(302, b"", headers | {"Location": location})

        def _send(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
            self.send_response(status)
            for k, v in headers.items():
                if v:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


@contextmanager
def fake_hub(repos: dict[str, Path]) -> Iterator[FakeHubServer]:
    """Serve `repos` on a free loopback port for the block; point HF_ENDPOINT at the yielded `.url`."""
    hub = FakeHubServer(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True  # a paused download does not hold up the shutdown
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def stub_hub(monkeypatch: pytest.MonkeyPatch, download: Callable[..., str]) -> None:
    """Replace the hub client in this process: `download` stands in for `huggingface_hub.snapshot_download`, whose
    look-ups in the Hugging Face cache (local_files_only) find nothing, and `automask.install.fetch_weights` (the
    resumable weights download, tested over HTTP against `fake_hub`) does nothing: no request can leave."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from automask import install

    def snapshot_download(*args: Any, **kwargs: Any) -> str:
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the test's Hugging Face cache")
        return download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(install, "fetch_weights", lambda *args: None)
    monkeypatch.setattr(install, "plan_weights", lambda *args: [])
