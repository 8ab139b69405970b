"""What the tests that start a real `remed serve` share: waiting for a condition, and the
server itself as a context manager (started from a config file, up when /healthz answers
200, stopped with SIGTERM whatever happens)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

REMED = str(Path(sys.executable).with_name("remed"))


def wait_for(pred: Callable[[], object], timeout: float = 90, every: float = 0.3) -> bool:
    """Whether `pred()` came true within `timeout` seconds (asked every `every` s, once more at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return bool(pred())


def http_status(url: str, headers: dict | None = None, timeout: float = 5) -> int:
    """The status of a GET of `url`; 0 when nothing answered."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


@contextlib.contextmanager
def serve_process(config: Path, port: int, up_timeout: float = 300) -> Iterator[dict]:
    """`remed serve --config CONFIG` listening on `port`, its output in serve.log beside the
    config: yields {"proc", "url", "log"} once /healthz answers 200; SIGTERM at the end."""
    log_path = config.parent / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen([REMED, "serve", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_for(lambda: proc.poll() is None and http_status(url + "/healthz") == 200, up_timeout, 1), \
                log_path.read_text()[-3000:]
            yield {"proc": proc, "url": url, "log": log_path}
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=180)
