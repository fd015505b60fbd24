"""The fast path's socket protocol (runtime/fastpath.py) on real Unix sockets, without Ray: a worker
holding the key is answered; a peer without it is refused before anything of its is unpickled; a
message longer than the bound is refused on either side without being read.

    .venv/bin/python -m pytest -q tests/unit/test_fastpath.py
"""

from __future__ import annotations

import secrets
import threading

import pytest

from layerpar.runtime import fastpath
from layerpar.runtime.fastpath import Refused, Rendezvous

pytestmark = pytest.mark.unit
WAIT_S = 60.0  # only catches a hang


def in_thread(fn, *args) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.fixture
def rendezvous(tmp_path):
    key = secrets.token_bytes(32)
    path = str(tmp_path / "fast.sock")
    rv = Rendezvous(path, key, backlog=2)
    yield path, key, rv
    rv.close()


def test_a_worker_with_the_key_is_accepted_and_answers(rendezvous):
    path, key, rv = rendezvous
    worker, result = in_thread(fastpath.serve, path, 3, key, lambda a, b: (a + b,))
    got = rv.accept(WAIT_S)
    assert got is not None and got[0] == 3
    conn = got[1]
    fastpath.send(conn, ("infer", 2, 5))
    assert fastpath.recv(conn, fastpath.MAX_REPLY_BYTES) == ("ok", 7)
    fastpath.send(conn, ("stop",))
    worker.join(WAIT_S)
    conn.close()
    assert result == {"value": 1}  # one request answered, then stopped


def test_a_peer_with_a_wrong_key_is_refused(rendezvous):
    path, _, rv = rendezvous
    peer, result = in_thread(fastpath.connect, path, 0, secrets.token_bytes(32))
    assert rv.accept(WAIT_S) is None  # refused: no connection comes out
    peer.join(WAIT_S)
    assert isinstance(result.get("error"), Refused | OSError)  # and the peer learns it was refused
    # the listener still takes the real worker afterwards
    worker, _ = in_thread(fastpath.serve, path, 0, rendezvous[1], lambda: ())
    got = rv.accept(WAIT_S)
    assert got is not None and got[0] == 0
    got[1].close()
    worker.join(WAIT_S)


def test_a_peer_that_sends_garbage_instead_of_the_answer_is_refused(rendezvous):
    import socket

    path, _, rv = rendezvous

    def garbage():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            fastpath.recv_bytes(s, 64)  # the challenge
            fastpath.send(s, ("a pickle", "never to be loaded"))
            return s.recv(1)  # b"": the driver hung up

    peer, result = in_thread(garbage)
    assert rv.accept(WAIT_S) is None
    peer.join(WAIT_S)
    assert result.get("value") == b""


def test_an_oversized_message_is_refused_unread_on_both_sides(rendezvous):
    path, key, rv = rendezvous
    connecting, connected = in_thread(fastpath.connect, path, 0, key)
    got = rv.accept(WAIT_S)
    connecting.join(WAIT_S)
    assert got is not None
    conn, peer = got[1], connected["value"]
    # worker -> driver: the header announces more than MAX_REPLY_BYTES
    peer.sendall(fastpath._LEN.pack(fastpath.MAX_REPLY_BYTES + 1))
    with pytest.raises(Refused, match="limit"):
        fastpath.recv(conn, fastpath.MAX_REPLY_BYTES)
    peer.close()
    conn.close()
    # driver -> worker: a request above MAX_REQUEST_BYTES ends the worker's loop unanswered
    worker, result = in_thread(fastpath.serve, path, 1, key, lambda *a: ("answered",))
    got = rv.accept(WAIT_S)
    assert got is not None
    conn = got[1]
    conn.sendall(fastpath._LEN.pack(fastpath.MAX_REQUEST_BYTES + 1))  # the header says what follows
    worker.join(WAIT_S)
    assert result == {"value": 0}  # refused: nothing answered, the loop returned
    assert conn.recv(1) == b""  # and it closed the socket
    conn.close()
