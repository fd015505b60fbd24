"""The same-node fast path for inference: one Unix socket per worker instead of one Ray task per call.

A Ray actor call costs 1.5-2 ms here (submit, schedule, reply) against a 20-60 us socket round trip.
When every worker shares the driver's node, the engine starts one long-running `serve_fast` task on
each worker's default thread; that task connects back to a socket the driver listens on and then
answers requests until told to stop. A request names the batch by its shared-memory slot
(runtime/shm.py), so only a few hundred bytes cross the socket each way.

    fast = FastPath(workers, timeout_s=120, startup_timeout_s=60, tag="1a2b3c4d")
    replies = fast.call([0, 1], ("infer", shared_input, num_branches, reduce))
    fast.close()    # each serve_fast task returns; the workers' default threads are free again

Because the loop occupies each worker's default thread, every other default-thread call (training,
loading, leaving the group) must come after `close()`: the engine closes the fast path before any of
them, and a recovery closes it before the workers leave their group. A stuck collective then looks
exactly as it does without the fast path: the worker cannot leave in time and is restarted.

Requests are length-prefixed pickles between processes of the same user on the same host (the
socket file is created with mode 0600 in a private temporary directory).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import tempfile
import threading
from collections.abc import Callable

import ray

_LEN = struct.Struct("!Q")
log = logging.getLogger("layerpar.runtime")


class FastPathError(RuntimeError):
    """A worker on the fast path died, closed its socket or did not answer in time."""


def send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_LEN.pack(len(data)) + data)


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None  # the peer closed the socket
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket):
    """The next message, or None when the peer has closed the socket."""
    head = _exactly(sock, _LEN.size)
    if head is None:
        return None
    body = _exactly(sock, _LEN.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def serve(path: str, rank: int, handle: Callable[..., tuple]) -> int:
    """Worker side: connect to the driver, then answer ("infer", ...) requests with
    ("ok", *handle(...)) or ("error", text) until ("stop",) or a closed socket. Returns the number of
    requests answered."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    answered = 0
    try:
        send(sock, rank)
        while True:
            msg = recv(sock)
            if msg is None or msg[0] == "stop":
                return answered
            try:
                reply = ("ok", *handle(*msg[1:]))
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which decides
                reply = ("error", f"{type(exc).__name__}: {exc}")
            send(sock, reply)
            answered += 1
    except OSError:  # the driver went away
        return answered
    finally:
        sock.close()


class FastPath:
    """Driver side: a connected socket per worker rank and the serve_fast tasks behind them."""

    def __init__(self, workers: list, *, timeout_s: float, startup_timeout_s: float, tag: str):
        self.workers = list(workers)
        self._dir = tempfile.mkdtemp(prefix=f"layerpar-{tag}-")
        path = os.path.join(self._dir, "fast.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conns: dict[int, socket.socket] = {}
        self.loops: list = []
        try:
            listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(len(workers))
            listener.settimeout(startup_timeout_s)
            self.loops = [w.serve_fast.remote(path, rank) for rank, w in enumerate(workers)]
            while len(self.conns) < len(workers):
                conn, _ = listener.accept()
                conn.settimeout(startup_timeout_s)
                rank = recv(conn)
                if not isinstance(rank, int) or rank in self.conns:
                    raise OSError(f"a worker sent {rank!r} instead of a new rank")
                conn.settimeout(timeout_s)
                self.conns[rank] = conn
        except (OSError, pickle.PickleError) as exc:
            self.close(wait_s=0)
            raise FastPathError(f"the fast path did not start: {exc}") from None
        finally:
            listener.close()
            try:
                os.unlink(path)
                os.rmdir(self._dir)
            except OSError:
                pass

    def call(self, ranks, msg) -> list[tuple]:
        """Send `msg` to every rank in `ranks`, then wait for each reply (in rank order)."""
        try:
            for r in ranks:
                send(self.conns[r], msg)
            replies = [recv(self.conns[r]) for r in ranks]
        except TimeoutError:
            raise FastPathError("a worker did not answer within parallel.timeout_s") from None
        except OSError as exc:
            raise FastPathError(f"a worker's fast-path socket failed ({exc})") from None
        if any(r is None for r in replies):
            raise FastPathError("a branch worker closed its fast-path socket (it died or stopped)")
        return replies

    def close(self, wait_s: float = 0.0) -> None:
        """Stop every loop; wait up to wait_s for the tasks to return. No wait is needed before the
        next call: it queues behind the loop on the worker's default thread, which returns on "stop"
        (a stuck loop never does: the recovery then finds that worker cannot leave its group)."""
        for conn in self.conns.values():
            try:
                send(conn, ("stop",))
            except OSError:
                pass
            conn.close()
        self.conns = {}
        if self.loops and wait_s > 0:
            ray.wait(self.loops, num_returns=len(self.loops), timeout=wait_s)
        self.loops = []


class FastLane:
    """The engine's fast path over its life: started for the current workers on first use,
    restarted when they change (a recovery replaced one), ended before any other call needs the
    workers' default threads, and switched off for good (with a warning) if it cannot start."""

    def __init__(self, *, enabled: bool, timeout_s: float, startup_timeout_s: float, tag: str):
        self.enabled, self.tag = enabled, tag
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self._fast: FastPath | None = None
        self._lock = threading.RLock()  # one call at a time: every worker sees the same order

    def call(self, workers: list, ranks: int, msg: tuple) -> list[tuple] | None:
        """Replies of ranks 0..ranks-1 to msg; None when the fast path is off."""
        with self._lock:
            fast = self._for(workers)
            return None if fast is None else fast.call(range(ranks), msg)

    def _for(self, workers: list) -> FastPath | None:
        if not self.enabled:
            return None
        fast = self._fast
        if fast is not None and len(fast.workers) == len(workers) and all(
                a is b for a, b in zip(fast.workers, workers, strict=True)):
            return fast
        self.end()
        try:
            self._fast = FastPath(workers, timeout_s=self.timeout_s,
                                  startup_timeout_s=self.startup_timeout_s, tag=self.tag)
        except FastPathError as exc:
            log.warning("inference goes through Ray actor calls: %s", exc)
            self.enabled = False
        return self._fast

    def end(self) -> None:
        with self._lock:
            if self._fast is not None:
                self._fast.close()
                self._fast = None
