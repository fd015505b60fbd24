"""The same-node fast path for inference: one Unix socket per worker instead of one Ray task per call.

A Ray actor call costs 1.5-2 ms here (submit, schedule, reply) against a 20-60 us socket round trip.
When every worker shares the driver's node, the engine starts one long-running `serve_fast` task on
each worker's default thread; that task connects back to a socket the driver listens on and then
answers requests until told to stop. A request names the batch by its shared-memory slot
(runtime/shm.py), so only a few hundred bytes cross the socket each way.

    fast = FastPath(workers, timeout_s=30, startup_timeout_s=60, heartbeat_s=3, tag="1a2b3c4d")
    replies = fast.call([0, 1], ("infer", shared_input, num_branches, reduce))
    fast.close()    # each serve_fast task returns; the workers' default threads are free again

Because the loop occupies each worker's default thread, every other default-thread call (training,
loading, leaving the group) must come after `close()`: the engine closes the fast path before any of
them, and a recovery closes it before the workers leave their group. A stuck collective then looks
exactly as it does without the fast path: the worker cannot leave in time and is restarted.

One call has one deadline (`timeout_s`, parallel.call_timeout_s) for every rank's reply together, and
while it waits the workers it waits on are pinged on their side threads (runtime/heartbeat.py): a
stopped worker process ends the call within parallel.heartbeat_s, not at the deadline.

Who may talk on the socket: it is created with mode 0600 in a private (0700) temporary directory and
unlinked once every worker has connected; a peer must also prove it holds the fast path's random key
(an HMAC-SHA256 challenge each way, before any pickle is read), and every message carries its length
first and is refused above a bound (MAX_REQUEST_BYTES to a worker, MAX_REPLY_BYTES to the driver).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import secrets
import select
import socket
import struct
import tempfile
import time
from collections.abc import Callable

import ray

from layerpar.parallel.comm import failed_collective
from layerpar.runtime.heartbeat import Heartbeat, WorkerSilent

_LEN = struct.Struct("!Q")
_RANK = struct.Struct("!I")
NONCE_BYTES = 32
MAX_REQUEST_BYTES = 1 << 20  # a request names a slot, or carries a batch of <= 64 KiB inline
MAX_REPLY_BYTES = 256 << 20  # the engine sends bigger replies through Ray (Transport.fast_call)
HANDSHAKE_S = 10.0  # longest wait for a connecting peer to prove it holds the key
log = logging.getLogger("layerpar.runtime")


class FastPathError(RuntimeError):
    """The fast path failed: a worker closed its socket, did not answer in time, or could not start."""


class PeerLost(FastPathError):
    """A worker on the fast path died or stopped (its heartbeat went unanswered)."""


class Refused(FastPathError):
    """A peer failed the key challenge or sent a message longer than allowed."""


# ---------------------------------------------------------------------------------------- framing

def send_bytes(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None  # the peer closed the socket
        buf += chunk
    return bytes(buf)


def recv_bytes(sock: socket.socket, max_bytes: int) -> bytes | None:
    """The next message's bytes, None when the peer has closed the socket; Refused when the peer
    announces more than max_bytes (nothing of it is read)."""
    head = _exactly(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > max_bytes:
        raise Refused(f"a fast-path peer sent a {n}-byte message; the limit is {max_bytes}")
    return _exactly(sock, n)


def send(sock: socket.socket, obj) -> None:
    send_bytes(sock, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(sock: socket.socket, max_bytes: int):
    """The next message, or None when the peer has closed the socket. Only called on a socket whose
    peer passed the key challenge: what it unpickles comes from a process holding the key."""
    body = recv_bytes(sock, max_bytes)
    return None if body is None else pickle.loads(body)


# -------------------------------------------------------------------------------------- handshake

def _mac(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, role + nonce, hashlib.sha256).digest()


def _expect(sock: socket.socket, want: bytes, n: int = 0) -> bytes:
    """Read one short handshake message that starts with `want` (and n more bytes); Refused if not."""
    got = recv_bytes(sock, len(want) + n)
    if got is None or len(got) != len(want) + n or not hmac.compare_digest(got[:len(want)], want):
        raise Refused("a fast-path peer failed the key challenge")
    return got[len(want):]


def connect(path: str, rank: int, key: bytes) -> socket.socket:
    """Worker side: connect to the driver and prove (and check) the key both ways."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_S)
        sock.connect(path)
        challenge = recv_bytes(sock, NONCE_BYTES)
        if challenge is None or len(challenge) != NONCE_BYTES:
            raise Refused("the fast-path listener sent no challenge")
        mine = secrets.token_bytes(NONCE_BYTES)
        send_bytes(sock, _mac(key, b"worker", challenge) + _RANK.pack(rank) + mine)
        _expect(sock, _mac(key, b"driver", mine))
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class Rendezvous:
    """Driver side: the listening socket the workers connect to, and the key challenge."""

    def __init__(self, path: str, key: bytes, backlog: int):
        self.key = key
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            os.chmod(path, 0o600)
            self.sock.listen(backlog)
        except BaseException:
            self.sock.close()
            raise

    def accept(self, timeout_s: float) -> tuple[int, socket.socket] | None:
        """(rank, connection) of the next peer that proves the key; None after timeout_s or when
        the peer fails the challenge (it is disconnected; the next one may still come)."""
        self.sock.settimeout(max(timeout_s, 1e-3))
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return None
        try:
            conn.settimeout(HANDSHAKE_S)
            nonce = secrets.token_bytes(NONCE_BYTES)
            send_bytes(conn, nonce)
            rest = _expect(conn, _mac(self.key, b"worker", nonce), _RANK.size + NONCE_BYTES)
            send_bytes(conn, _mac(self.key, b"driver", rest[_RANK.size:]))
            return _RANK.unpack(rest[:_RANK.size])[0], conn
        except (OSError, FastPathError) as exc:
            log.warning("fast path: refused a connection: %s", exc)
            conn.close()
            return None

    def close(self) -> None:
        self.sock.close()


def serve(path: str, rank: int, key: bytes, handle: Callable[..., tuple]) -> int:
    """Worker side: connect to the driver, then answer ("infer", ...) requests with
    ("ok", *handle(...)) or ("error", text, failed collective?) until ("stop",) or a closed socket.
    Returns the number of requests answered."""
    sock = connect(path, rank, key)
    answered = 0
    try:
        while True:
            msg = recv(sock, MAX_REQUEST_BYTES)
            if msg is None or msg[0] == "stop":
                return answered
            try:
                reply = ("ok", *handle(*msg[1:]))
            except Exception as exc:  # noqa: BLE001 - reported to the driver, which decides
                reply = ("error", f"{type(exc).__name__}: {exc}", failed_collective(exc))
            send(sock, reply)
            answered += 1
    except (OSError, Refused):  # the driver went away (or broke the protocol): stop serving
        return answered
    finally:
        sock.close()


# ----------------------------------------------------------------------------------------- driver

class FastPath:
    """Driver side: a connected socket per worker rank and the serve_fast tasks behind them."""

    def __init__(self, workers: list, *, timeout_s: float, startup_timeout_s: float,
                 heartbeat_s: float, tag: str):
        self.workers, self.timeout_s, self.heartbeat_s = list(workers), timeout_s, heartbeat_s
        self.conns: dict[int, socket.socket] = {}
        self.loops: list = []
        directory = tempfile.mkdtemp(prefix=f"layerpar-{tag}-")  # mode 0700
        path = os.path.join(directory, "fast.sock")
        key = secrets.token_bytes(32)  # reaches the workers inside Ray's (authenticated) task call
        try:
            rendezvous = Rendezvous(path, key, len(workers))
            try:
                self.loops = [w.serve_fast.remote(path, rank, key) for rank, w in enumerate(workers)]
                self._accept(rendezvous, startup_timeout_s)
            finally:
                rendezvous.close()
        except (OSError, FastPathError) as exc:
            self.close(wait_s=0)
            if isinstance(exc, PeerLost):
                raise
            raise FastPathError(f"the fast path did not start: {exc}") from None
        finally:
            for leftover in (lambda: os.unlink(path), lambda: os.rmdir(directory)):
                try:
                    leftover()
                except OSError:
                    pass

    def _accept(self, rendezvous: Rendezvous, startup_timeout_s: float) -> None:
        beat = Heartbeat(self.workers, self.heartbeat_s)
        deadline = time.monotonic() + startup_timeout_s
        while len(self.conns) < len(self.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                raise FastPathError(f"not every worker connected within {startup_timeout_s:g}s")
            got = rendezvous.accept(min(left, beat.interval_s))
            if got is not None:
                rank, conn = got
                if rank >= len(self.workers) or rank in self.conns:
                    conn.close()
                    raise FastPathError(f"a worker sent rank {rank}, not a new rank")
                self.conns[rank] = conn
            try:
                beat.check(r for r in range(len(self.workers)) if r not in self.conns)
            except WorkerSilent as exc:
                raise PeerLost(str(exc)) from None

    def call(self, ranks, msg) -> list[tuple]:
        """Send `msg` to every rank in `ranks`, then collect the replies (in rank order) before one
        deadline; PeerLost as soon as a worker still owing a reply misses its heartbeat."""
        ranks = list(ranks)
        deadline = time.monotonic() + self.timeout_s
        beat = Heartbeat(self.workers, self.heartbeat_s)
        replies: dict[int, tuple] = {}
        try:
            for r in ranks:
                send(self.conns[r], msg)
            while len(replies) < len(ranks):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FastPathError(f"a worker did not answer within parallel.call_timeout_s="
                                        f"{self.timeout_s:g}s")
                pending = {self.conns[r]: r for r in ranks if r not in replies}
                readable, _, _ = select.select(list(pending), [], [], min(left, beat.interval_s))
                for conn in readable:
                    conn.settimeout(max(deadline - time.monotonic(), 0.1))  # the rest of a message
                    reply = recv(conn, MAX_REPLY_BYTES)
                    if reply is None:
                        raise PeerLost("a branch worker closed its fast-path socket (it died or stopped)")
                    replies[pending[conn]] = reply
                beat.check(r for r in ranks if r not in replies)
        except WorkerSilent as exc:
            raise PeerLost(str(exc)) from None
        except TimeoutError:
            raise FastPathError(f"a worker did not answer within parallel.call_timeout_s="
                                f"{self.timeout_s:g}s") from None
        except OSError as exc:
            raise FastPathError(f"a worker's fast-path socket failed ({exc})") from None
        return [replies[r] for r in ranks]

    def close(self, wait_s: float = 0.0) -> None:
        """Stop every loop; wait up to wait_s for the tasks to return. No wait is needed before the
        next call: it queues behind the loop on the worker's default thread, which returns on "stop"
        (a stuck loop never does: the recovery then finds that worker cannot leave its group)."""
        for conn in self.conns.values():
            try:
                conn.settimeout(0.1)  # a stopped worker's full socket buffer must not block us
                send(conn, ("stop",))
            except OSError:
                pass
            conn.close()
        self.conns = {}
        if self.loops and wait_s > 0:
            ray.wait(self.loops, num_returns=len(self.loops), timeout=wait_s)
        self.loops = []
