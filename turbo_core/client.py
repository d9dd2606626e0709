"""A small client for a running ComfyUI's HTTP API, and `python -m turbo_core queue`.

    python -m turbo_core queue workflows/api/turbodiffusion_t2v_api.json --server http://127.0.0.1:8188 \\
        --set 4.text="a red fox in the snow" --set TurboSampler.seed=7 --out videos/

Uploads --image (POST /upload/image) into every LoadImage node, submits the prompt
(POST /prompt), follows it on the websocket (/ws) with a progress bar, prints node
errors readably, and downloads what the output nodes saved (GET /view).

HTTP is the standard library's urllib; the websocket is the `websocket-client`
package (pure Python, no dependencies), which handles framing, fragmentation, pings
and close frames that a hand-written client would have to get right.
Never imports torch or ComfyUI.
"""
from __future__ import annotations

import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field


class ComfyError(RuntimeError):
    """Something the server refused or failed to do; str() is meant for users."""


class PromptRejected(ComfyError):
    """POST /prompt answered 400: the prompt did not validate."""

    def __init__(self, body: dict):
        self.body = body
        self.node_errors = body.get("node_errors") or {}
        super().__init__(format_prompt_errors(body))


class ExecutionFailed(ComfyError):
    """A node raised while the prompt ran."""

    def __init__(self, data: dict):
        self.data = data
        self.node_id = data.get("node_id")
        self.node_type = data.get("node_type")
        self.exception_message = (data.get("exception_message") or "").strip()
        kind = str(data.get("exception_type") or "error").rsplit(".", 1)[-1]  # CheckpointError, not its module
        super().__init__(f"node {self.node_id} ({self.node_type}) failed: {kind}: {self.exception_message}")


class ExecutionInterrupted(ComfyError):
    def __init__(self, data: dict):
        self.data = data
        super().__init__(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")


def format_prompt_errors(body: dict) -> str:
    """The 400 answer of POST /prompt as readable lines: one per problem, naming node and input."""
    err = body.get("error") or {}
    lines = [err.get("message", "prompt rejected") + (f": {err['details']}" if err.get("details") else "")]
    for node_id, info in (body.get("node_errors") or {}).items():
        seen = set()
        for e in info.get("errors", []):
            text, details = e.get("message", ""), e.get("details") or ""
            if e.get("type") == "custom_validation_failed" and " - " in details:
                text = details.split(" - ", 1)[1]  # "<input> - <the node's own message>"
            elif details:
                text += f": {details}"
            if text not in seen:  # ComfyUI repeats a VALIDATE_INPUTS failure once per input it takes
                seen.add(text)
                lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {text}")
    return "\n".join(lines)


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict  # node id -> what the node returned under "ui"
    files: list[str] = field(default_factory=list)  # downloaded paths
    seconds: float = 0.0


class ComfyClient:
    """ComfyUI's HTTP + websocket API (the 2024 and the newest server speak the same)."""

    def __init__(self, server: str = "http://127.0.0.1:8188", client_id: str | None = None, timeout: float = 30):
        self.server = server.rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout

    # -- plain HTTP ----------------------------------------------------------

    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None, method=None):
        req = urllib.request.Request(self.server + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.URLError as err:
            if isinstance(err, urllib.error.HTTPError):
                raise
            raise ComfyError(f"cannot reach ComfyUI at {self.server}: {err.reason}") from None

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def post_json(self, path: str, obj) -> dict:
        body = self._request(path, json.dumps(obj).encode(), {"Content-Type": "application/json"}, "POST")
        return json.loads(body) if body.strip() else {}

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def interrupt(self) -> None:
        self._request("/interrupt", b"", method="POST")

    def upload_image(self, path: str, subfolder: str = "", overwrite: bool = True) -> str:
        """POST /upload/image (multipart); returns the name to put in a LoadImage node."""
        boundary = uuid.uuid4().hex
        name = os.path.basename(path)
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        with open(path, "rb") as f:
            content = f.read()
        parts = []
        fields = (("type", "input"), ("subfolder", subfolder), ("overwrite", "true" if overwrite else "false"))
        for key, value in fields:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        body = self._request("/upload/image", b"".join(parts),
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"}, "POST")
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected (with node_errors) on HTTP 400."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                parsed = json.loads(body)
            except ValueError:
                raise ComfyError(f"POST /prompt: HTTP {err.code}: {body[:500]!r}") from None
            raise PromptRejected(parsed) from None
        if answer.get("node_errors"):
            raise PromptRejected(answer)
        return answer["prompt_id"]

    def download(self, entry: dict, out_dir: str) -> str:
        """GET /view for one saved-file entry ({filename, subfolder, type}); returns the local path."""
        query = urllib.parse.urlencode({k: entry.get(k, "") for k in ("filename", "subfolder", "type")})
        data = self._request(f"/view?{query}")
        dest = os.path.join(out_dir, entry.get("subfolder") or "", entry["filename"])
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)
        return dest

    # -- websocket -----------------------------------------------------------

    def connect(self):
        """Open /ws for this client id (before queueing, so no message is missed)."""
        import websocket  # websocket-client

        url = self.server.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        try:
            return websocket.create_connection(f"{url}/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, websocket.WebSocketException) as err:
            raise ComfyError(f"cannot reach ComfyUI at {self.server}: {err}") from None

    def wait(self, ws, prompt_id: str, *, timeout: float = 3600, on_event=None) -> dict:
        """Follow `prompt_id` on the websocket until it ends; returns its /history entry.

        on_event(type, data) sees every JSON message. Raises ExecutionFailed or
        ExecutionInterrupted. Completion is `execution_success` (newest ComfyUI) or
        `executing` with node None (2024); both are accepted, and /history decides.
        """
        import websocket

        deadline = time.monotonic() + timeout
        ws.settimeout(1.0)
        while True:
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                entry = self.history(prompt_id)  # a message may have been missed: ask
                if entry.get("status", {}).get("completed") is not None or entry.get("outputs"):
                    return self._finished(prompt_id, entry)
                continue
            if isinstance(raw, bytes):  # binary preview images
                continue
            msg = json.loads(raw)
            kind, data = msg.get("type"), msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if on_event is not None:
                on_event(kind, data)
            if kind == "execution_error":
                raise ExecutionFailed(data)
            if kind == "execution_interrupted":
                raise ExecutionInterrupted(data)
            done = kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                                    and data.get("prompt_id") == prompt_id)
            if done:
                return self._finished(prompt_id, self._history_when_ready(prompt_id))

    def _history_when_ready(self, prompt_id: str, wait: float = 10) -> dict:
        end = time.monotonic() + wait
        while True:
            entry = self.history(prompt_id)
            if entry or time.monotonic() > end:
                return entry
            time.sleep(0.05)

    @staticmethod
    def _finished(prompt_id: str, entry: dict) -> dict:
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            for kind, data in status.get("messages", []):
                if kind == "execution_error":
                    raise ExecutionFailed(data)
                if kind == "execution_interrupted":
                    raise ExecutionInterrupted(data)
            raise ComfyError(f"prompt {prompt_id} failed: {status}")
        return entry

    def run(self, prompt: dict, out_dir: str | None = None, *, timeout: float = 3600, progress: bool = False,
            on_event=None) -> RunResult:
        """Queue, follow, and download every file the output nodes report (if out_dir is given)."""
        t0 = time.monotonic()
        ws = self.connect()
        try:
            prompt_id = self.queue(prompt)
            reporter = _ProgressPrinter(prompt) if progress else None

            def events(kind, data):
                if reporter is not None:
                    reporter(kind, data)
                if on_event is not None:
                    on_event(kind, data)

            try:
                entry = self.wait(ws, prompt_id, timeout=timeout, on_event=events)
            finally:
                if reporter is not None:
                    reporter.close()
        finally:
            ws.close()
        outputs = entry.get("outputs", {})
        files = []
        if out_dir is not None:
            for item in saved_files(outputs):
                files.append(self.download(item, out_dir))
        return RunResult(prompt_id, outputs, files, time.monotonic() - t0)


def saved_files(outputs: dict) -> list[dict]:
    """Every {filename, subfolder, type} entry the output nodes reported (images, videos, gifs, ...)."""
    found = []
    for node_out in outputs.values():
        for value in node_out.values():
            if isinstance(value, list):
                found += [v for v in value if isinstance(v, dict) and "filename" in v and v.get("type") == "output"]
    return found


class _ProgressPrinter:
    """Websocket events -> one line per node and a tqdm bar for nodes that report steps."""

    def __init__(self, prompt: dict):
        self.prompt = prompt
        self.bar = None
        self.bar_node = None

    def _name(self, node) -> str:
        info = self.prompt.get(str(node), {})
        title = (info.get("_meta") or {}).get("title") or info.get("class_type", "?")
        return f"{node} {title}"

    def __call__(self, kind, data):
        from tqdm import tqdm

        if kind == "executing" and data.get("node") is not None:
            self.close()
            tqdm.write(f"running node {self._name(data['node'])}", file=sys.stderr)
        elif kind == "execution_cached" and data.get("nodes"):
            tqdm.write(f"cached: {', '.join(map(str, data['nodes']))}", file=sys.stderr)
        elif kind == "progress":
            node = data.get("node")
            if self.bar is None or node != self.bar_node:
                self.close()
                self.bar = tqdm(total=data.get("max", 1), desc=self._name(node), unit="step", file=sys.stderr)
                self.bar_node = node
            self.bar.total = data.get("max", self.bar.total)
            self.bar.update(max(0, data.get("value", 0) - self.bar.n))

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------
# editing an API-format prompt

def load_api_workflow(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if not isinstance(data, dict) or "nodes" in data and isinstance(data.get("nodes"), list):
        raise ValueError(f"{path} is a UI workflow (it has a 'nodes' list): queue the *_api.json file, or export "
                         f"one from ComfyUI with 'Save (API Format)'")
    if not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ValueError(f"{path} is not an API-format prompt ({{node id: {{class_type, inputs}}}})")
    return data


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _find_nodes(prompt: dict, ref: str) -> list[str]:
    if ref in prompt:
        return [ref]
    matches = [k for k, v in prompt.items() if v.get("class_type") == ref or (v.get("_meta") or {}).get("title") == ref]
    if not matches:
        raise ValueError(f"--set: no node {ref!r} (node ids: {', '.join(prompt)}; or a class_type / title)")
    return matches


def apply_set(prompt: dict, assignment: str) -> None:
    """NODE.INPUT=VALUE; NODE is a node id, class_type or title (every match is set). VALUE is JSON or text."""
    target, sep, value = assignment.partition("=")
    ref, dot, name = target.rpartition(".")
    if not sep or not dot or not ref or not name:
        raise ValueError(f"--set {assignment!r}: use NODE.INPUT=VALUE, e.g. 3.seed=42 or TurboSampler.steps=2")
    for node in _find_nodes(prompt, ref):
        inputs = prompt[node].setdefault("inputs", {})
        if isinstance(inputs.get(name), list):
            raise ValueError(f"--set {assignment!r}: input {name!r} of node {node} is a link, not a value")
        inputs[name] = _parse_value(value)


def set_image(prompt: dict, image_name: str) -> int:
    """Point every LoadImage node at `image_name`; returns how many were set."""
    nodes = [v for v in prompt.values() if v.get("class_type") == "LoadImage"]
    for node in nodes:
        node.setdefault("inputs", {})["image"] = image_name
    return len(nodes)


# ---------------------------------------------------------------------------
# command line

def add_queue_parser(subparsers) -> None:
    p = subparsers.add_parser("queue", help="run an API-format workflow on a running ComfyUI server",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="API-format workflow (*_api.json)")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="change an input; NODE is a node id, class_type or title; VALUE is JSON or text "
                        "(repeatable)")
    p.add_argument("--image", help="upload this image and use it in every LoadImage node")
    p.add_argument("--out", default="comfyui_outputs", help="folder for the downloaded outputs (default %(default)s)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run (default %(default)s)")
    p.set_defaults(func=run_queue)


def run_queue(args) -> int:
    try:
        prompt = load_api_workflow(args.workflow)
        for assignment in args.set:
            apply_set(prompt, assignment)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    client = ComfyClient(args.server)
    try:
        if args.image:
            name = client.upload_image(args.image)
            if not set_image(prompt, name):
                print(f"warning: uploaded {name}, but the workflow has no LoadImage node", file=sys.stderr)
        result = client.run(prompt, args.out, timeout=args.timeout, progress=True)
    except PromptRejected as err:
        print(f"error: the server refused the prompt:\n{err}", file=sys.stderr)
        return 2
    except ComfyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done in {result.seconds:.1f} s (prompt {result.prompt_id})")
    for path in result.files:
        print(f"saved {path}")
    if not result.files:
        print("the workflow's output nodes saved no files", file=sys.stderr)
    return 0
