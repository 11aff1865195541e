"""The review page's server: one local web page over one dataset folder, for a person checking the teacher.

A server and not a static page, because a decision must be on disk (`reviews.jsonl`, fsynced) before the page
may call it saved, and `train.json` / `val.json` must follow at once so the next `train` reads the reviewed
labels. Every decision is one request: under the cross-process log lock, append then derive the splits, then
answer. Nothing is kept only in memory: `/api/state` folds the log on disk at each call, so two tabs (or two
servers) on one dataset both see every decision.

Every request must carry this start's token (the URL printed at start): the page serves a person's photos and
writes their work, and any other local user, or any web page open in the same browser, could reach the port.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import sys
import threading
import webbrowser
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ElementalError
from ..task import Task
from . import dataset, log
from .queue import build_queue

STATIC = Path(__file__).with_name("static")
ASSETS = {"review.js": "text/javascript; charset=utf-8", "review.css": "text/css; charset=utf-8"}
TOKEN_HEADER = "X-Review-Token"
DECISIONS = ("accept", "relabel", "drop")
# The token travels in URLs: no Referer may carry it off, and nothing the server answers is cached but photos.
PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ApiError(Exception):
    """A refused request: the HTTP status and the one line the page shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Review:
    """The loaded dataset (photos by digest, the queue) and every operation on it; one per server start.

    Requests run in a thread pool: `mutex` keeps one at a time on the loaded state; `log.locked` keeps one
    writer at a time across processes.
    """

    def __init__(self, dataset_dir: Path, task: Task, run_dir: Path | None) -> None:
        self.dataset_dir = Path(dataset_dir)
        self.task = task
        self.run_dir = run_dir
        self.mutex = threading.Lock()
        self.generation = 0  # bumped at each reload: a page holding an older one fetches the state again
        self.notice: str | None = None
        if not self.dataset_dir.is_dir():
            raise ElementalError(f"dataset directory not found: {self.dataset_dir}")
        self._load()

    def _load(self) -> None:
        """Apply decisions a killed server left unapplied, then read the teacher's photos and order them."""
        dataset.sync(self.dataset_dir, self.task)
        stamp = self._stamp()  # after sync, whose first apply on an older dataset writes teacher_labels.json
        self.photos = {p.digest: p for p in dataset.photos(self.dataset_dir, self.task)}
        self.queue = build_queue(list(self.photos.values()), list(self.task.labels), self.run_dir)
        self.stamp = stamp  # last: a load that failed is tried again at the next request

    def _stamp(self) -> tuple[int, ...]:
        """What changes when `prepare` runs again: the folder's inode (it replaces the folder in one rename) and
        the teacher's labels file, or the split files while an older dataset has none."""
        try:
            folder = self.dataset_dir.stat().st_ino
        except FileNotFoundError:
            raise ApiError(410, f"the dataset folder {self.dataset_dir} is gone (moved or deleted): "
                                "start `elemental review` again on the dataset") from None
        teacher = self.dataset_dir / dataset.TEACHER_FILE
        files = [teacher] if teacher.exists() else [self.dataset_dir / f"{s}.json" for s in dataset.SPLITS]
        return (folder, *(n for f in files for n in _inode_mtime(f)))

    def refresh(self) -> None:
        """Reload when the dataset changed on disk; tell the page only when the teacher's photos or labels did
        (this server's own first decision on an older dataset writes teacher_labels.json: no news)."""
        if self._stamp() == self.stamp:
            return
        before = _teacher_view(self.photos.values())
        try:
            self._load()
        except ElementalError as e:
            raise ApiError(409, f"the dataset changed on disk and cannot be read: {e}") from None
        if _teacher_view(self.photos.values()) != before:
            self.generation += 1
            self.notice = (f"The dataset changed on disk (prepared again?): reloaded, {len(self.photos)} photos. "
                           "Your decisions are kept in reviews.jsonl.")

    def read_only(self) -> str | None:
        """The banner for a folder decisions cannot be saved in, or None."""
        if os.access(self.dataset_dir, os.W_OK):
            return None
        return (f"{self.dataset_dir} is read-only: decisions cannot be saved. "
                "Make it writable, or review a writable copy.")

    def state(self, _body: None = None) -> dict[str, Any]:
        with self.mutex:
            self.refresh()
            standing = log.states(log.read(self.dataset_dir))
            items = [{**i.to_json(), "decision": _decision_json(standing.get(i.photo.digest))}
                     for i in self.queue.items]
            return {"dataset": str(self.dataset_dir), "labels": list(self.task.labels), "items": items,
                    "notes": self.queue.notes, "counts": self._counts(standing), "warning": self.read_only(),
                    "notice": self.notice, "generation": self.generation}

    def decide(self, body: dict[str, Any]) -> dict[str, Any]:
        """accept / relabel (to `label`) / drop one photo; a relabel to the teacher's own label is an accept."""
        digest, action = _field(body, "digest"), _field(body, "action")
        if action not in DECISIONS:
            raise ApiError(400, f"action: {action!r} is not one of {list(DECISIONS)}")
        label = _field(body, "label") if action == "relabel" else None
        if label is not None and label not in self.task.labels:
            raise ApiError(400, f"label: {label!r} is not one of the task's labels {list(self.task.labels)}")
        with self.mutex:
            self.refresh()
            photo = self._photo(digest)
            teacher = photo.record.element
            if label == teacher:
                action = "accept"
            new = None if action == "drop" else label or teacher
            self._write(log.Decision(digest, photo.record.image_id, action, teacher, new, log.now()))
            return self._answer(digest)

    def undo(self, body: dict[str, Any]) -> dict[str, Any]:
        """Pop the photo's newest standing decision (whichever tab made it: the log has one order)."""
        digest = _field(body, "digest")
        with self.mutex:
            self.refresh()
            photo = self._photo(digest)
            if digest not in log.states(log.read(self.dataset_dir)):
                raise ApiError(400, f"digest: photo {photo.record.image_id} has no decision to undo")
            self._write(log.Decision(digest, photo.record.image_id, "undo", photo.record.element, None, log.now()))
            return self._answer(digest)

    def image(self, digest: str) -> Path:
        """The JPEG of a photo of this dataset, found by digest: a request never names a path. (No mutex: it runs
        on the event loop, and a reload swaps `photos` for a new dict in one assignment.)"""
        photo = self.photos.get(digest)
        root = self.dataset_dir.resolve()
        path = (root / photo.record.image_path).resolve() if photo else None
        if path is None or not path.is_relative_to(root) or not path.is_file():
            raise ApiError(404, "no such photo in this dataset")
        return path

    def _write(self, decision: log.Decision) -> None:
        """Append, then derive the splits; the caller answers only after both. A decision the dataset cannot
        take (the last photo of a split dropped) is undone in the log at once, so log and splits agree."""
        if warning := self.read_only():
            raise ApiError(503, warning)
        try:
            with log.locked(self.dataset_dir):
                log.append(self.dataset_dir, decision)
                known = list(self.photos.values())  # loaded and checked at start (and at each reload)
                try:
                    dataset.apply(self.dataset_dir, self.task, known)
                except ElementalError as e:
                    if decision.action == "undo":  # nothing to take back: the next start derives the splits
                        raise ApiError(503, f"undone in {log.LOG_NAME}; train.json/val.json not rewritten: {e}") \
                            from None
                    log.append(self.dataset_dir, replace(decision, action="undo", new=None, time=log.now()))
                    dataset.apply(self.dataset_dir, self.task, known)
                    raise ApiError(409, f"not saved: {e}") from None
        except ElementalError as e:
            raise ApiError(503, f"not saved: {e}") from None

    def _photo(self, digest: str) -> dataset.Photo:
        photo = self.photos.get(digest)
        if photo is None:
            raise ApiError(400, f"digest: no photo {digest[:16]!r} in this dataset (reload the page)")
        return photo

    def _answer(self, digest: str) -> dict[str, Any]:
        standing = log.states(log.read(self.dataset_dir))
        return {"digest": digest, "decision": _decision_json(standing.get(digest)),
                "counts": self._counts(standing), "generation": self.generation}

    def _counts(self, standing: dict[str, log.Decision]) -> dict[str, int]:
        """The page's tally, as `dataset.apply` writes it into metadata.json."""
        both = sum(dataset.tally(list(self.photos.values()), standing).values(), Counter())
        return {"total": len(self.photos), **{k: both[k] for k in ("reviewed", "changed", "dropped")}}


def _inode_mtime(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)


def _teacher_view(photos: Iterable[dataset.Photo]) -> list[tuple[str, str, str]]:
    return [(p.digest, p.split, p.record.element) for p in photos]


def _decision_json(d: log.Decision | None) -> dict[str, Any] | None:
    return None if d is None else {"action": d.action, "new": d.new, "time": d.time}


def _field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name}: missing or not a string")
    return value


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "body: not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body: expected a JSON object")
    return body


def _api(handler: Callable[[Any], dict[str, Any]]) -> Callable[[Request], Awaitable[Response]]:
    """JSON in and out. The handler runs in a worker thread (it fsyncs and rewrites files); its refusals become
    `{"error": "..."}` with their status, and a broken log or dataset a 409 naming the file."""

    async def endpoint(request: Request) -> Response:
        try:
            body = await _json_body(request) if request.method == "POST" else None
            result = await run_in_threadpool(handler, body)
        except ApiError as e:
            return JSONResponse({"error": str(e)}, e.status, headers=PRIVATE)
        except ElementalError as e:
            return JSONResponse({"error": str(e)}, 409, headers=PRIVATE)
        return JSONResponse(result, headers=PRIVATE)

    return endpoint


class TokenGuard:
    """Refuses any request without this start's token (header X-Review-Token, or query `token` for the page and
    its photos, which the browser fetches without headers)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
            if not secrets.compare_digest(given.encode(), self.token):
                text = "forbidden: open the URL `elemental review` printed (it holds the token)\n"
                await PlainTextResponse(text, 403, headers=PRIVATE)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(dataset_dir: Path, task: Task, run_dir: Path | None, token: str) -> Starlette:
    """The review app over `dataset_dir` (loaded and synced now), guarded by `token`."""
    review = Review(dataset_dir, task, run_dir)
    page = (STATIC / "review.html").read_text(encoding="utf-8").replace("__TOKEN__", token)

    async def index(_: Request) -> Response:
        return HTMLResponse(page, headers={**PRIVATE, "Content-Security-Policy": CSP})

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return PlainTextResponse("not found\n", 404, headers=PRIVATE)
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=PRIVATE)

    async def image(request: Request) -> Response:
        try:
            path = review.image(request.path_params["digest"])
        except ApiError as e:
            return PlainTextResponse(f"{e}\n", e.status, headers=PRIVATE)
        # Named by content (the digest), so a photo never changes under its URL: the browser may keep it.
        headers = {"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    routes = [Route("/", index), Route("/static/{name}", asset), Route("/img/{digest}", image),
              Route("/api/state", _api(review.state)),
              Route("/api/decide", _api(review.decide), methods=["POST"]),
              Route("/api/undo", _api(review.undo), methods=["POST"])]
    return Starlette(routes=routes, middleware=[Middleware(TokenGuard, token=token)])


def serve(dataset_dir: Path, task: Task, run_dir: Path | None, host: str = "127.0.0.1", port: int = 8765,
          open_browser: bool = True, say: Callable[[str], Any] = print) -> None:
    """Serve the review page until Ctrl-C or SIGTERM; `say` the page's URL (the one line holding the token) once
    the server is listening. Port 0 takes any free port, and the URL names the real one."""
    import uvicorn

    token = secrets.token_urlsafe(16)
    app = make_app(Path(dataset_dir), task, run_dir, token)
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/?token={token}"
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    async def run() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.02)
        if server.started:
            say(f"review: {url}")
            sys.stdout.flush()
            if open_browser:
                threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        await serving

    with sock, _signals_end_quietly():
        asyncio.run(run())
    say(f"review: stopped; every decision is in {log.log_path(Path(dataset_dir))}")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ElementalError(f"cannot listen on {host}:{port}: {e.strerror or e} (--port 0 takes any free port)") \
            from None


@contextmanager
def _signals_end_quietly() -> Iterator[None]:
    """uvicorn shuts down gracefully on Ctrl-C / SIGTERM, then raises the signal again for the handler it
    found; the no-op handlers set here take it, so the command ends with exit 0 and no traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
