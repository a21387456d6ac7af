"""The lab's HTTP server: one page and four JSON endpoints, on the standard library's ThreadingHTTPServer.

    GET  /               the page (lab/static/index.html, read once at start; no other file is ever served)
    GET  /api/info       the model, the adapters and their layers, the defaults and the limits
    POST /api/render     settings -> one PNG per cell (base64), labelled by column and seed
    POST /api/spectrum   settings + adapter + layer -> singular values, energy kept at k, ‖ΔW‖ per block
    GET  /api/progress   UNet calls done / needed in the running render

Safety: nothing a request carries names a file (layers are looked up among the adapted ones, adapters by index);
bodies, prompts, steps, images and layer tables are bounded (settings.py); one render runs at a time with at most
MAX_WAITING queued behind it, and at most MAX_CONNECTIONS requests are handled at once; a bad request gets a 4xx
JSON error and the server goes on serving.
"""
from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from PIL import Image

from .panels import spectrum_panel
from .render import Renderer
from .settings import (GROUPS, KINDS, MAX_CELLS, MAX_IMAGES, MAX_PROMPT_CHARS, MAX_RANK_COLUMNS, MAX_STEPS,
                       SettingsError, parse_settings)
from .state import Lab

MAX_BODY_BYTES = 64 * 1024
MAX_CONNECTIONS = 16
MAX_WAITING = 2              # renders queued behind the running one; more get 429
SOCKET_TIMEOUT_S = 30        # a client that stops sending mid-request is dropped


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def png_bytes(image) -> bytes:
    """A uint8 [H, W, 3] array as PNG bytes (lossless: the page shows exactly the rendered pixels)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class LabApp:
    """What the endpoints do, apart from HTTP: each takes decoded JSON and returns JSON (or raises RequestError)."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.renderer = Renderer(lab)
        self.page = resources.files(__package__).joinpath("static/index.html").read_bytes()
        self.waiting = 0
        self.waiting_lock = threading.Lock()

    def settings(self, data: Any):
        lab = self.lab
        try:
            return parse_settings(data, layer_names=lab.layer_names, max_rank=lab.max_rank,
                                  n_loras=len(lab.adapters), defaults=lab.defaults)
        except SettingsError as err:
            raise RequestError(400, str(err)) from None

    def info(self) -> dict[str, Any]:
        lab = self.lab
        return {
            "checkpoint": lab.ckpt.rsplit("/", 1)[-1], "version": lab.model.version,
            "width": lab.width, "height": lab.height, "max_rank": lab.max_rank,
            "defaults": lab.defaults.to_json(), "groups": list(GROUPS), "kinds": list(KINDS),
            "limits": {"steps": MAX_STEPS, "images": MAX_IMAGES, "prompt_chars": MAX_PROMPT_CHARS,
                       "rank_columns": MAX_RANK_COLUMNS, "cells": MAX_CELLS},
            "adapters": [{
                "label": a.label, "kind": a.kind, "max_rank": a.max_rank,
                "layers": [{"name": ly.name, "block": ly.block, "group": ly.group, "kind": ly.kind,
                            "adapter": ly.adapter, "rank": ly.rank, "alpha": ly.alpha, "shape": list(ly.shape)}
                           for ly in a.layers.values()],
            } for a in lab.adapters],
        }

    def render(self, data: Any) -> dict[str, Any]:
        settings = self.settings(data)
        with self.waiting_lock:
            if self.waiting > MAX_WAITING:
                raise RequestError(429, f"busy: {self.waiting} renders are already running or waiting")
            self.waiting += 1
        try:
            start = time.perf_counter()
            results = self.renderer.render(settings)
            seconds = time.perf_counter() - start
        finally:
            with self.waiting_lock:
                self.waiting -= 1
        cells = [{"adapter": column.adapter, "rank": column.settings.rank, "label": column.label,
                  "seed": settings.seed + i, "png": base64.b64encode(png_bytes(image)).decode("ascii")}
                 for column, images in results for i, image in enumerate(images)]
        return {"settings": settings.to_json(), "seconds": seconds, "columns": len(results),
                "rows": settings.images, "cells": cells}

    def spectrum(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise RequestError(400, "expected a JSON object {adapter, layer, settings}")
        extra = sorted(set(data) - {"adapter", "layer", "settings"})
        if extra:
            raise RequestError(400, f"unknown fields: {', '.join(map(str, extra))[:200]}")
        adapter, layer = data.get("adapter"), data.get("layer")
        if isinstance(adapter, bool) or not isinstance(adapter, int) or not 0 <= adapter < len(self.lab.adapters):
            raise RequestError(400, f"adapter: expected an index from 0 to {len(self.lab.adapters) - 1}")
        if not isinstance(layer, str) or layer not in self.lab.adapters[adapter].layers:
            raise RequestError(400, f"layer: {str(layer)[:100]!r} is not a layer of adapter {adapter}")
        return spectrum_panel(self.lab, adapter, layer, self.settings(data.get("settings", {})))

    def progress(self) -> dict[str, Any]:
        p = self.renderer.progress
        return {"done": min(p.done, p.total), "total": p.total, "running": p.running}


class Handler(BaseHTTPRequestHandler):
    server: "LabServer"
    timeout = SOCKET_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = "lora-lab"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  quiet unless asked
        if self.server.verbose:
            super().log_message(format, *args)

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, data: Any) -> None:
        self.send_body(status, json.dumps(data).encode(), "application/json")

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message, "status": status})

    def read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "a JSON body with a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read: this connection cannot be reused
            raise RequestError(413, f"request body over {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise RequestError(400, f"the body is not JSON: {str(err)[:100]}") from None

    def route(self, method: str) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0]
        try:
            if method == "GET" and path in ("/", "/index.html"):
                self.send_body(200, app.page, "text/html; charset=utf-8")
                return
            if method == "GET" and path == "/api/info":
                result = app.info()
            elif method == "GET" and path == "/api/progress":
                result = app.progress()
            elif method == "POST" and path == "/api/render":
                result = app.render(self.read_json())
            elif method == "POST" and path == "/api/spectrum":
                result = app.spectrum(self.read_json())
            elif path in ("/", "/index.html", "/api/info", "/api/progress", "/api/render", "/api/spectrum"):
                raise RequestError(405, f"{method} is not allowed on {path}")
            else:
                raise RequestError(404, f"no such page: {path[:100]}")
            self.send_json(200, result)
        except RequestError as err:
            if method == "POST" and err.status in (404, 405):
                self.close_connection = True  # its body was not read
            self.send_error_json(err.status, str(err))
        except (ConnectionError, TimeoutError):  # the client went away: nobody to answer
            self.close_connection = True
        except Exception as err:  # a bug must not stop the server: answer 500 and go on
            self.close_connection = True
            self.send_error_json(500, f"{type(err).__name__}: {str(err)[:300]}")

    def do_GET(self) -> None:  # noqa: N802
        self.route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self.route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self.route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self.route("DELETE")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, an unsupported method) as JSON too."""
        self.close_connection = True
        try:
            self.send_error_json(code, message or HTTPStatus(code).phrase)
        except OSError:
            pass


class LabServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that handles at most MAX_CONNECTIONS connections at once and answers 503 beyond."""

    daemon_threads = True
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], app: LabApp, verbose: bool = False) -> None:
        super().__init__(address, Handler)
        self.app = app
        self.verbose = verbose
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                body = b'{"error": "too many connections", "status": 503}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        """A client that went away is no error worth a traceback; anything else is printed as usual."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(lab: Lab, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> LabServer:
    """A server for `lab` bound to host:port (port 0: any free one; server.server_address has it). Call
    serve_forever(), or start it in a thread for tests."""
    return LabServer((host, port), LabApp(lab), verbose=verbose)
