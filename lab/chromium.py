"""A headless Chromium driven over its DevTools pipe: the lab's browser tests and its screenshot use it.

Chromium started with --remote-debugging-pipe reads DevTools protocol commands from its fd 3 and writes answers and
events to its fd 4, each a JSON message ending in a NUL byte: no port, no websocket, nothing beyond the standard
library. Use the browser Debian packages (`apt-get install chromium`); find_chromium() says where it is.

    python -m lab.chromium http://127.0.0.1:8024/ docs/img/lab.png        # the page once it has rendered
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ChromiumError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The browser: $LAB_CHROMIUM, else the first of chromium, chromium-browser, google-chrome on the PATH."""
    given = os.environ.get("LAB_CHROMIUM")
    if given:
        return given if shutil.which(given) else None
    return next((found for name in NAMES if (found := shutil.which(name))), None)


def _high_fd(fd: int) -> int:
    """The same pipe end at a number of 10 or more (close-on-exec), so that the child's fds 3 and 4 never clash."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Chromium:
    """One headless browser with one page. Use as a context manager; every call waits at most `timeout` seconds."""

    def __init__(self, binary: str | None = None, width: int = 1400, height: int = 900, timeout: float = 60.0) -> None:
        binary = binary or find_chromium()
        if not binary:
            raise ChromiumError("no Chromium found (apt-get install chromium, or set LAB_CHROMIUM)")
        bash = shutil.which("bash")
        if not bash:
            raise ChromiumError("bash is needed to start Chromium with its DevTools pipe")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="lab-chromium-")
        self.proc = None
        to_child_r, self._to_child = map(_high_fd, os.pipe())
        self._from_child, from_child_w = map(_high_fd, os.pipe())
        flags = ["--headless", "--remote-debugging-pipe", "--disable-gpu", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--mute-audio", "--hide-scrollbars",
                 "--no-proxy-server",            # the lab is on this machine: never through a proxy from the env
                 "--disable-dev-shm-usage",      # containers often have a tiny /dev/shm
                 f"--user-data-dir={self.profile}", f"--window-size={width},{height}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox (CI runs as root)
        # bash moves the two pipe ends to the fds 3 and 4 that Chromium expects, then becomes Chromium (bash, not
        # sh: dash takes single-digit fd numbers only, and these are 10 or more).
        trampoline = 'eval "exec 3<&$1 4>&$2 $1<&- $2>&-"; shift 2; exec "$@"'
        self.proc = subprocess.Popen(
            [bash, "-c", trampoline, "bash", str(to_child_r), str(from_child_w), binary, *flags, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(to_child_r, from_child_w), start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                     session=False)["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            self.send("Page.enable")
            self.send("Runtime.enable")
        except Exception:
            self.close()
            raise

    # -- the protocol ---------------------------------------------------------------------------------
    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChromiumError(f"no answer from Chromium within {self.timeout:g} s")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise ChromiumError(f"Chromium closed its DevTools pipe (exit status {self.proc.poll()})")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True) -> dict[str, Any]:
        """One DevTools command (to the page's session unless session=False); its result, events skipped."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise ChromiumError(f"{method}: {answer['error'].get('message', answer['error'])}")
                return answer.get("result", {})

    # -- what the tests do ------------------------------------------------------------------------------
    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited); a thrown error raises."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            raise ChromiumError(f"JavaScript error: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float | None = None, poll: float = 0.05) -> Any:
        """Evaluate until the expression is truthy; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                value = self.evaluate(expression)
            except ChromiumError:
                value = None  # the page may still be loading
            if value:
                return value
            if time.monotonic() > deadline:
                raise ChromiumError(f"timed out waiting for: {expression}")
            time.sleep(poll)

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.send("Browser.close", session=False)
            except (ChromiumError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# The page sets window.lab.renders and .idle (lab/static/index.html): a render has finished and none is on its way.
RENDERED = "window.lab && window.lab.renders >= {n} && window.lab.idle"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.chromium",
                                description="Screenshot of the lab page once it has rendered, by headless Chromium.")
    p.add_argument("url", help="the lab's address, e.g. http://127.0.0.1:8024/")
    p.add_argument("out", type=Path, help="PNG file to write")
    p.add_argument("--width", type=int, default=1400, help="viewport width in pixels (default: 1400)")
    p.add_argument("--height", type=int, default=820, help="viewport height in pixels (default: 820)")
    p.add_argument("--eval", default=None, metavar="JS",
                   help="JavaScript run once the first render is done, e.g. to move a slider; the screenshot waits "
                        "for the render it causes (default: none)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step (default: 120)")
    args = p.parse_args(argv)
    try:
        with Chromium(width=args.width, height=args.height, timeout=args.timeout) as browser:
            browser.goto(args.url)
            browser.wait_for(RENDERED.format(n=1))
            if args.eval:
                browser.evaluate(args.eval)
                browser.wait_for(RENDERED.format(n=2))
            time.sleep(0.3)  # the spectrum panel's answer
            browser.screenshot(args.out)
    except ChromiumError as err:
        p.exit(1, f"{p.prog}: error: {err}\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
