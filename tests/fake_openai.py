"""A small OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (not a mock of the client).

The real `openai` SDK talks real HTTP to it. It answers chat completions with image inputs and a
json_schema response format the way the teacher would: the label comes from the photo itself (its
mean colour, matching `elemental.synthetic`'s looks), so tests can check labels are right. Per photo
a script of behaviours can be queued (429 with Retry-After, 500, malformed JSON, an off-list label,
confidence 1.7, a refusal, a slow answer, ...). It also serves the Batch API (/v1/files,
/v1/batches, /v1/files/{id}/content).

It counts requests and billed answers per photo — keyed by the sha256 of the JPEG it received
(`photo_key`) — so tests prove that no photo is ever paid for twice.
"""

from __future__ import annotations

import base64
import colorsys
import email.parser
import email.policy
import hashlib
import io
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image, ImageStat

Behaviour = str | tuple[Any, ...]
GOOD = "good"


def photo_key(jpeg: bytes) -> str:
    """The server's id for a photo: sha256 of the JPEG bytes it was sent."""
    return hashlib.sha256(jpeg).hexdigest()


def element_of(img: Image.Image) -> str:
    """The label a perfect teacher gives `elemental.synthetic` photos, from the mean colour alone."""
    r, g, b = (c / 255 for c in ImageStat.Stat(img.convert("RGB")).mean)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s < 0.2:
        return "metal"
    if 0.4 <= h <= 0.75:
        return "water"
    if 0.15 <= h < 0.4:
        return "land"
    return "fire" if v > 0.7 else "wood"


class FakeOpenAI:
    """Start with `with FakeOpenAI() as server:`; point the SDK at `server.base_url`.

    Behaviours (queued per photo with `script(key, ...)`, or for every photo with `default`):
    "good"; ("status", code, headers, body_dict); ("429", retry_after_seconds); "500";
    "malformed" (content that is not JSON); "off_list"; "confidence_high" (1.7); "confidence_text";
    "refusal"; "empty"; "no_reason"; ("slow", seconds) (then a good answer);
    "echo_auth" (a 401 whose body repeats the Authorization header, as a careless server might);
    "truncated" (JSON cut off, finish_reason "length", as when max_tokens runs out); what real servers
    send around a good answer: "fenced" (a ```json fence), "parts" (a list of content parts),
    "chatty" (words before and after the JSON object).
    `refuse_params` names request parameters answered with OpenAI's 400 "Unsupported parameter".
    `served_model` is the `model` every answer names (as llama-server names its GGUF whatever was asked
    for); unset, the requested name is echoed. A text-only request (the teacher's probe) is answered
    "OK" and counted in `probes`, not per photo.
    Batches finish after `batch_polls_to_complete` polls, or with `batch_seconds` set, on the first poll
    `batch_seconds` after their creation (all batches run at once: `max_batches_running`); a batch
    ends `batch_end_status` ("completed", or e.g. "expired" with only its first `batch_answer_first`
    requests answered, as an expired OpenAI batch keeps what it finished).
    """

    def __init__(
        self,
        *,
        delay: float = 0.0,
        expected_key: str | None = None,
        labeler: Callable[[Image.Image], str] = element_of,
        batch_polls_to_complete: int = 2,
        refuse_params: frozenset[str] = frozenset(),
        served_model: str | None = None,
        batch_seconds: float | None = None,
    ) -> None:
        self.delay = delay
        self.served_model = served_model
        self.probes = 0
        self.probe_fails = False  # answer the probe with a 500 (not billed)
        self.batch_seconds = batch_seconds
        self.batch_end_status = "completed"
        self.batch_answer_first: int | None = None
        self.max_batches_running = 0
        self.refuse_params = refuse_params
        self.params_seen: list[dict[str, Any]] = []  # sampling parameters of every chat request
        self.expected_key = expected_key
        self.labeler = labeler
        self.batch_polls_to_complete = batch_polls_to_complete
        self.default: list[Behaviour] = []
        self.lock = threading.Lock()
        self._scripts: dict[str, list[Behaviour]] = defaultdict(list)
        self.requests: Counter[str] = Counter()  # per photo: every chat request that reached us
        self.billed: Counter[str] = Counter()  # per photo: answers with usage (what a provider charges)
        self.request_times: dict[str, list[float]] = defaultdict(list)
        self.messages_seen: dict[str, list[int]] = defaultdict(list)  # per photo: len(messages) per request
        self.usage_in = self.usage_out = 0
        self.batch_usage_in = self.batch_usage_out = 0
        self.details: set[str] = set()
        self.inflight = self.max_inflight = 0  # concurrent chat requests being handled
        self.auth_headers: set[str] = set()
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_hold = False  # keep batches in_progress (a long-running batch)
        self.endpoint_calls: Counter[str] = Counter()
        self.hold_after: int | None = None  # answer this many chat requests, then hang until release()
        self._release = threading.Event()
        self.held = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # A short poll interval: shutdown() waits up to one interval, once per test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()

    def release(self) -> None:
        """Let held requests go (they answer 503 and are not billed)."""
        self.hold_after = None
        self._release.set()

    # -- scripting and counting ----------------------------------------------------------------
    def script(self, key: str, *behaviours: Behaviour) -> None:
        with self.lock:
            self._scripts[key].extend(behaviours)

    def _next_behaviour(self, key: str) -> Behaviour:
        with self.lock:
            queue = self._scripts.get(key)
            if queue:
                return queue.pop(0)
            return self.default[0] if self.default else GOOD

    def total_billed(self) -> int:
        return sum(self.billed.values())

    # -- chat completions ----------------------------------------------------------------------
    def chat(self, body: dict[str, Any], auth: str, *, in_batch: bool = False) -> tuple[int, dict[str, str], Any]:
        """One chat completion: (HTTP status, extra headers, JSON body or raw bytes)."""
        with self.lock:
            self.params_seen.append({k: body[k] for k in ("max_tokens", "max_completion_tokens", "temperature",
                                                          "seed") if k in body})
        for name in sorted(self.refuse_params & body.keys()):
            hint = " Use 'max_completion_tokens' instead." if name == "max_tokens" else ""
            return 400, {}, {"error": {"message": f"Unsupported parameter: '{name}' is not supported with this "
                                                  f"model.{hint}", "type": "invalid_request_error", "param": name}}
        if _text_only(body):
            return self._probe(body)
        try:
            jpeg, detail, labels = _check_request(body)
        except ValueError as e:
            return 400, {}, {"error": {"message": str(e), "type": "invalid_request_error"}}
        key = photo_key(jpeg)
        with self.lock:
            self.details.add(detail)
            self.requests[key] += 1
            self.request_times[key].append(time.monotonic())
            self.messages_seen[key].append(len(body["messages"]))
            hold = not in_batch and self.hold_after is not None and self.total_billed() >= self.hold_after
            if hold:
                self.held += 1
        if hold:
            self._release.wait(60)
            return 503, {}, {"error": {"message": "released"}}
        behaviour = self._next_behaviour(key)
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return self._answer(key, jpeg, labels, behaviour, auth, in_batch, body.get("model", "?"))
        finally:
            with self.lock:
                self.inflight -= 1

    def _answer(
        self, key: str, jpeg: bytes, labels: list[str], behaviour: Behaviour, auth: str, in_batch: bool, model: str
    ) -> tuple[int, dict[str, str], Any]:
        if self.delay and not in_batch:
            time.sleep(self.delay)
        kind = behaviour if isinstance(behaviour, str) else behaviour[0]
        if kind == "status":
            return behaviour[1], behaviour[2], behaviour[3]
        if kind == "429":
            return 429, {"Retry-After": str(behaviour[1])}, {"error": {"message": "Rate limit reached"}}
        if kind == "500":
            return 500, {"retry-after-ms": "10"}, {"error": {"message": "The server had an error"}}
        if kind == "echo_auth":
            return 401, {}, {"error": {"message": f"Incorrect API key provided: {auth}"}}
        if kind == "slow":
            time.sleep(behaviour[1])
        img = Image.open(io.BytesIO(jpeg))
        element = self.labeler(img)
        if element not in labels:
            element = labels[0]
        answer: dict[str, Any] = {"element": element, "reason": f"the photo looks like {element}",
                                  "confidence": 0.9}
        content: Any = json.dumps(answer)
        refusal = None
        finish = "stop"
        if kind == "truncated":
            content, finish = content[: len(content) // 2], "length"
        elif kind == "fenced":
            content = f"```json\n{content}\n```"
        elif kind == "parts":
            content = [{"type": "text", "text": content}]
        elif kind == "chatty":
            content = f"Here is the label you asked for: {content} Let me know if you need more."
        elif kind == "malformed":
            content = '{"element": "' + element + '", "reason": oops'
        elif kind == "off_list":
            content = json.dumps({**answer, "element": "plasma"})
        elif kind == "confidence_high":
            content = json.dumps({**answer, "confidence": 1.7})
        elif kind == "confidence_text":
            content = json.dumps({**answer, "confidence": "high"})
        elif kind == "no_reason":
            content = json.dumps({"element": element, "confidence": 0.8})
        elif kind == "empty":
            content = ""
        elif kind == "refusal":
            content, refusal = None, "I'm sorry, I can't help with that."
        tin = 100 + int(key[:2], 16)  # deterministic, different per photo, so sums are meaningful
        tout = 20 + int(key[2], 16)
        with self.lock:
            self.billed[key] += 1
            self.usage_in += tin
            self.usage_out += tout
            if in_batch:
                self.batch_usage_in += tin
                self.batch_usage_out += tout
        completion = {
            "id": f"chatcmpl-{key[:8]}-{self.requests[key]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model or model,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": refusal}}],
            "usage": {"prompt_tokens": tin, "completion_tokens": tout, "total_tokens": tin + tout},
        }
        return 200, {}, completion

    def _probe(self, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            self.probes += 1
        if self.probe_fails:
            return 500, {"retry-after-ms": "10"}, {"error": {"message": "The server had an error"}}
        with self.lock:
            self.usage_in += 12
            self.usage_out += 1
        return 200, {}, {
            "id": f"chatcmpl-probe-{self.probes}", "object": "chat.completion", "created": int(time.time()),
            "model": self.served_model or body.get("model", "?"),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "OK", "refusal": None}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13},
        }

    # -- files and batches ---------------------------------------------------------------------
    def upload(self, content_type: str, raw: bytes) -> dict[str, Any]:
        msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        fields: dict[str, Any] = {}
        filename = "upload"
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                filename = part.get_filename()
            fields[name] = part.get_payload(decode=True)
        with self.lock:
            file_id = f"file-{len(self.files) + 1:04d}"
            obj = {"id": file_id, "object": "file", "bytes": len(fields.get("file", b"")),
                   "created_at": int(time.time()), "filename": filename,
                   "purpose": (fields.get("purpose") or b"").decode(), "status": "processed"}
            self.files[file_id] = {"meta": obj, "content": fields.get("file", b"")}
        return obj

    def create_batch(self, body: dict[str, Any]) -> tuple[int, Any]:
        if body.get("input_file_id") not in self.files:
            return 400, {"error": {"message": "no such input file"}}
        with self.lock:
            batch_id = f"batch_{len(self.batches) + 1:04d}"
            n = sum(1 for line in self.files[body["input_file_id"]]["content"].splitlines() if line.strip())
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
                "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window"),
                "status": "validating", "output_file_id": None, "error_file_id": None,
                "created_at": int(time.time()), "metadata": body.get("metadata"),
                "request_counts": {"total": n, "completed": 0, "failed": 0}, "_polls": 0,
                "_created": time.monotonic(),
            }
            running = sum(b["status"] in ("validating", "in_progress") for b in self.batches.values())
            self.max_batches_running = max(self.max_batches_running, running)
            return 200, _public(self.batches[batch_id])

    def retrieve_batch(self, batch_id: str, auth: str) -> tuple[int, Any]:
        batch = self.batches.get(batch_id)
        if batch is None:
            return 404, {"error": {"message": f"no batch {batch_id}"}}
        batch["_polls"] += 1
        if self.batch_seconds is not None:
            if batch["status"] == "validating":
                batch["status"] = "in_progress"
            if (batch["status"] == "in_progress" and not self.batch_hold
                    and time.monotonic() - batch["_created"] >= self.batch_seconds):
                self._run_batch(batch, auth)
        elif batch["status"] == "validating":
            batch["status"] = "in_progress"
        elif batch["status"] == "in_progress" and not self.batch_hold:
            if batch["_polls"] >= self.batch_polls_to_complete:
                self._run_batch(batch, auth)
        return 200, _public(batch)

    def _run_batch(self, batch: dict[str, Any], auth: str) -> None:
        """Answer every line through `chat` (behaviours and billing apply), then publish the output file."""
        out_lines = []
        for line in self.files[batch["input_file_id"]]["content"].decode().splitlines():
            if not line.strip():
                continue
            if self.batch_answer_first is not None and len(out_lines) >= self.batch_answer_first:
                break
            req = json.loads(line)
            status, _, body = self.chat(req["body"], auth, in_batch=True)
            out_lines.append(json.dumps({
                "id": f"batch_req_{len(out_lines)}", "custom_id": req["custom_id"],
                "response": {"status_code": status, "request_id": "req", "body": body},
                "error": None,
            }))
        with self.lock:
            file_id = f"file-{len(self.files) + 1:04d}"
            content = ("\n".join(out_lines) + "\n").encode()
            self.files[file_id] = {"meta": {"id": file_id, "object": "file", "bytes": len(content),
                                            "created_at": int(time.time()), "filename": "output.jsonl",
                                            "purpose": "batch_output", "status": "processed"},
                                   "content": content}
        batch["status"] = self.batch_end_status
        batch["output_file_id"] = file_id
        batch["request_counts"]["completed"] = len(out_lines)


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _text_only(body: dict[str, Any]) -> bool:
    """A request without an image and without the answer schema: the teacher asking which model serves."""
    messages = body.get("messages") or []
    return "response_format" not in body and all(isinstance(m.get("content"), str) for m in messages)


def _check_request(body: dict[str, Any]) -> tuple[bytes, str, list[str]]:
    """Insist on what a real endpoint needs: a data-URL JPEG image and a strict json_schema format."""
    fmt = body.get("response_format") or {}
    if fmt.get("type") != "json_schema" or not fmt.get("json_schema", {}).get("strict"):
        raise ValueError("response_format must be a strict json_schema")
    schema = fmt["json_schema"]["schema"]
    labels = schema["properties"]["element"]["enum"]
    for message in body.get("messages", []):
        if message.get("role") == "user" and isinstance(message.get("content"), list):
            for part in message["content"]:
                if part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    prefix = "data:image/jpeg;base64,"
                    if not url.startswith(prefix):
                        raise ValueError("image must be a JPEG data URL")
                    jpeg = base64.b64decode(url[len(prefix):])
                    with Image.open(io.BytesIO(jpeg)) as img:
                        if max(img.size) > 512:
                            raise ValueError(f"image is {img.size}, larger than 512 px")
                    return jpeg, part["image_url"].get("detail", "auto"), labels
    raise ValueError("no image in the request")


def _handler_for(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if not isinstance(body, bytes)
                                 else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorised(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            with server.lock:
                server.auth_headers.add(auth)
            if server.expected_key is not None and auth != f"Bearer {server.expected_key}":
                self._send(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
                return None
            return auth

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            raw = self._body()
            auth = self._authorised()
            if auth is None:
                return
            path = self.path.split("?")[0]
            with server.lock:
                server.endpoint_calls[f"POST {path}"] += 1
            if path == "/v1/chat/completions":
                status, headers, body = server.chat(json.loads(raw), auth)
                self._send(status, body, headers)
            elif path == "/v1/files":
                self._send(200, server.upload(self.headers["Content-Type"], raw))
            elif path == "/v1/batches":
                status, body = server.create_batch(json.loads(raw))
                self._send(status, body)
            else:
                self._send(404, {"error": {"message": f"no route {path}"}})

        def do_GET(self) -> None:  # noqa: N802
            auth = self._authorised()
            if auth is None:
                return
            path = self.path.split("?")[0]
            with server.lock:
                server.endpoint_calls[f"GET {path}"] += 1
            parts = path.strip("/").split("/")
            if parts[:2] == ["v1", "batches"] and len(parts) == 3:
                status, body = server.retrieve_batch(parts[2], auth)
                self._send(status, body)
            elif parts[:2] == ["v1", "batches"] and len(parts) == 2:
                data = [_public(b) for b in server.batches.values()]
                self._send(200, {"object": "list", "data": data, "has_more": False})
            elif parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content":
                f = server.files.get(parts[2])
                self._send(200, f["content"]) if f else self._send(404, {"error": {"message": "no such file"}})
            else:
                self._send(404, {"error": {"message": f"no route {path}"}})

    return Handler
