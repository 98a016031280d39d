#!/usr/bin/env python3
"""A simulated HTTP worker for Guildhall's demo cluster (docker-compose.yml).

Python 3 standard library only. One process plays one stage's worker: a
`guildhall-agent` POSTs each task to it and acts on the answer. It takes a
random, lognormal time per task and fails a configured share of them, so
the coordinator has something to watch (the same shape as `guildhall demo`'s
built-in simulated workers, but over the real HTTP hand-off).

The hand-off contract (README, "The worker contract"; agent/src/handoff/http.rs)
--------------------------------------------------------------------------------
Request: `POST <any path>`, the task's payload as the body (opaque bytes) and
the headers `x-guildhall-task-id`, `x-guildhall-stage`, `x-guildhall-attempt`,
`idempotency-key` (`<task id>/<stage>/<attempt>`) and `traceparent`.

Answers of this worker:

  200      success; the body is the payload of the next stage. A JSON-object
           (or empty) payload comes back with `{"stage", "worker", "attempt",
           "ms"}` appended to its `"trail"` list; any other payload is
           echoed unchanged.
  503      retryable failure (the agent retries it with backoff, then
           dead-letters it), with `x-guildhall-error-class: <class>`.
  422      permanent failure (dead-lettered at once), with
           `x-guildhall-error-class: <class>`.

(The agent also treats 408, 429 and every 5xx as retryable and any other 4xx
as permanent; without `x-guildhall-error-class` the class is `http_<status>`.
An error class is 1-40 characters of `a-z 0-9 _`.)

`GET /health` answers 200 `{"status": "ok"}` (for a healthcheck);
`python3 worker.py --healthcheck` GETs it on 127.0.0.1:$PORT and exits 0 when
it answers 200, 1 otherwise, so a container needs no curl.

Answers are HTTP/1.0 and close the connection: every task is a new
connection, so an agent that reaches its workers through a DNS name (a
scaled compose service) looks the name up again for each task.

Configuration (environment)
---------------------------
  PORT                     port to listen on (default 8000; 0 picks a free one)
  HOST                     address to listen on (default 0.0.0.0)
  MEDIAN_MS                median service time in ms (default 200)
  SPREAD                   sigma of the lognormal service time (default 0.5)
  RETRYABLE_FAILURE_RATE   share of tasks answered 503 (default 0)
  PERMANENT_FAILURE_RATE   share of tasks answered 422 (default 0)
  ERROR_CLASS              comma-separated classes for retryable failures, one
                           picked at random per failure (default
                           upstream_unavailable)
  PERMANENT_ERROR_CLASS    class for permanent failures (default invalid_input)
  WORKER_NAME              name put in results and log lines (default: host name)
  SEED                     seed of the random generator (default: random)
  QUIET                    1 to log nothing per task (default: one line per task)

Once listening it prints `listening on http://HOST:PORT` (with the real port).
A bad value is one line on stderr and exit status 2. SIGTERM (and SIGINT) stop
it after the tasks in hand are answered.
"""

import json
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_CLASS_RE = re.compile(r"^[a-z0-9_]{1,40}$")

# Largest request body accepted (the agent's own limit on results is 64 MiB).
MAX_BODY = 64 << 20


class ConfigError(Exception):
    """A bad environment value: reported as one line, exit status 2."""


def env_number(name, default, low, high, kind=float):
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number (got {raw!r})") from None
    if not (low <= value <= high) or (kind is float and math.isnan(value)):
        raise ConfigError(f"{name} must be between {low} and {high} (got {raw!r})")
    return value


def env_classes(name, default):
    raw = os.environ.get(name, "").strip() or default
    classes = [c.strip() for c in raw.split(",") if c.strip()]
    if not classes:
        raise ConfigError(f"{name} names no error class (got {raw!r})")
    for c in classes:
        if not ERROR_CLASS_RE.match(c):
            raise ConfigError(
                f"{name}: {c!r} is not an error class (1-40 characters of a-z, 0-9, _)"
            )
    return classes


class Config:
    def __init__(self):
        self.port = env_number("PORT", 8000, 0, 65535, int)
        self.host = os.environ.get("HOST", "").strip() or "0.0.0.0"
        self.median_ms = env_number("MEDIAN_MS", 200.0, 0.0, 3_600_000.0)
        self.spread = env_number("SPREAD", 0.5, 0.0, 5.0)
        self.retryable = env_number("RETRYABLE_FAILURE_RATE", 0.0, 0.0, 1.0)
        self.permanent = env_number("PERMANENT_FAILURE_RATE", 0.0, 0.0, 1.0)
        if self.retryable + self.permanent > 1.0:
            raise ConfigError(
                "RETRYABLE_FAILURE_RATE + PERMANENT_FAILURE_RATE must be at most 1 "
                f"(got {self.retryable} + {self.permanent})"
            )
        self.error_classes = env_classes("ERROR_CLASS", "upstream_unavailable")
        self.permanent_class = env_classes("PERMANENT_ERROR_CLASS", "invalid_input")[0]
        self.name = os.environ.get("WORKER_NAME", "").strip() or socket.gethostname()
        seed = os.environ.get("SEED", "").strip()
        self.rng = random.Random(seed if seed else None)
        self.rng_lock = threading.Lock()
        self.quiet = os.environ.get("QUIET", "").strip() not in ("", "0", "false")

    def draw(self):
        """One task's fate: (service time in seconds, failure or None)."""
        with self.rng_lock:
            ms = self.median_ms * math.exp(self.spread * self.rng.gauss(0.0, 1.0))
            u = self.rng.random()
            if u < self.retryable:
                failure = ("retryable", self.rng.choice(self.error_classes))
            elif u < self.retryable + self.permanent:
                failure = ("permanent", self.permanent_class)
            else:
                failure = None
        return ms / 1000.0, failure


def log(line):
    print(line, flush=True)


class Handler(BaseHTTPRequestHandler):
    server_version = "guildhall-demo-worker"
    sys_version = ""
    # HTTP/1.0: one request per connection (see the header comment).
    protocol_version = "HTTP/1.0"
    # Head and body leave in one write: the writer is buffered (flushed once
    # the request is answered) and TCP_NODELAY is set. With an unbuffered
    # writer the head and the body are two writes, and Nagle's algorithm
    # holds the second until the agent ACKs the first, which a client that
    # delays its ACKs does for up to ~40 ms: on every task.
    wbufsize = -1
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # the default logs every request to stderr
        pass

    def answer(self, status, body, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.split("?", 1)[0] in ("/health", "/healthz"):
            self.answer(200, b'{"status": "ok"}', [("Content-Type", "application/json")])
        else:
            self.answer(404, b'{"error": "not found"}', [("Content-Type", "application/json")])

    def do_POST(self):
        config = self.server.config
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not (0 <= length <= MAX_BODY):
            # Bad framing is the request's fault: permanent.
            self.answer(
                400, b"bad or missing Content-Length", [("x-guildhall-error-class", "bad_request")]
            )
            return
        payload = self.rfile.read(length)
        task = self.headers.get("x-guildhall-task-id", "-")
        stage = self.headers.get("x-guildhall-stage", "-")
        attempt = self.headers.get("x-guildhall-attempt", "-")
        seconds, failure = config.draw()
        time.sleep(seconds)
        ms = round(seconds * 1000)
        if failure is None:
            body = result(payload, stage, config.name, attempt, ms)
            self.answer(200, body, [("Content-Type", "application/octet-stream")])
            outcome = "ok"
        else:
            kind, klass = failure
            status = 503 if kind == "retryable" else 422
            message = f"simulated {kind} failure ({klass}) after {ms} ms".encode()
            headers = [("x-guildhall-error-class", klass), ("Content-Type", "text/plain")]
            self.answer(status, message, headers)
            outcome = f"{kind} {klass} ({status})"
        if not config.quiet:
            log(f"{stage} task {task} attempt {attempt}: {outcome} in {ms} ms")


def result(payload, stage, worker, attempt, ms):
    """The next stage's payload: a JSON object gets this stage's entry in
    its trail; anything else is passed on unchanged."""
    try:
        value = json.loads(payload) if payload.strip() else {}
    except ValueError:
        return payload
    if not isinstance(value, dict):
        return payload
    trail = value.get("trail")
    if not isinstance(trail, list):
        trail = []
    try:
        attempt = int(attempt)
    except ValueError:
        pass
    trail.append({"stage": stage, "worker": worker, "attempt": attempt, "ms": ms})
    value["trail"] = trail
    return json.dumps(value, separators=(",", ":")).encode()


class Server(ThreadingHTTPServer):
    # Threads are joined on close, so a stop answers the tasks in hand first.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 128


def healthcheck():
    port = os.environ.get("PORT", "").strip() or "8000"
    if port == "0":
        print("worker.py: error: --healthcheck needs the real PORT, not 0", file=sys.stderr)
        return 1
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            if response.status == 200:
                return 0
            print(f"worker.py: error: {url} answered {response.status}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 (any failure is "unhealthy")
        print(f"worker.py: error: {url}: {e}", file=sys.stderr)
    return 1


def main(argv):
    if argv[1:] == ["--healthcheck"]:
        return healthcheck()
    if argv[1:]:
        print(
            f"worker.py: error: unexpected arguments {argv[1:]} (only --healthcheck)",
            file=sys.stderr,
        )
        return 2
    try:
        config = Config()
    except ConfigError as e:
        print(f"worker.py: error: {e}", file=sys.stderr)
        return 2
    try:
        server = Server((config.host, config.port), Handler)
    except OSError as e:
        print(
            f"worker.py: error: cannot listen on {config.host}:{config.port}: {e}",
            file=sys.stderr,
        )
        return 1
    server.config = config

    def stop(signum, _frame):
        log(f"{signal.Signals(signum).name} received: stopping after the tasks in hand")
        # shutdown() waits for serve_forever to return: not from its own thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log(
        f"{config.name}: median {config.median_ms:g} ms (spread {config.spread:g}), "
        f"retryable {config.retryable:g} ({','.join(config.error_classes)}), "
        f"permanent {config.permanent:g} ({config.permanent_class})"
    )
    log(f"listening on http://{host}:{port}")
    server.serve_forever()
    server.server_close()
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
