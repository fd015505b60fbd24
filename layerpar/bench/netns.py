"""Two-rank torch.distributed jobs across a rate-limited link: two network namespaces and a veth pair.

    with ShapedLink(rate="1gbit") as link:
        rank0, rank1 = link.run_ranks([sys.executable, "rank.py"], timeout_s=120)

What exists while a ShapedLink is open (all of it created, and deleted, by the link itself; needs root):

    namespace lpA-<pid>-<rand>   veth lv<pid><rand>a  10.213.X.Y+1/30  rank 0, TCPStore on MASTER_PORT
    namespace lpB-<pid>-<rand>   veth lv<pid><rand>b  10.213.X.Y+2/30  rank 1
    lo is up in both; a tbf qdisc shapes each veth end's egress, so both directions run at `rate`.

Nothing listens in the host's namespace. Rank 0's TCPStore listens on MASTER_ADDR:MASTER_PORT (rank
0's veth address, a random port) inside namespace A; gloo's pair sockets bind the veth address of
their own namespace (GLOO_SOCKET_IFNAME / TP_SOCKET_IFNAME name it), so every byte between the ranks
crosses the shaped veth. The veth is created directly inside the namespaces: no name or address is
ever added to the host's namespace, and links opened in parallel cannot collide.

Clean-up (kill the ranks by their Popen handles, delete the veth, then the two namespaces; only what
this link made) runs on normal exit, on exception, on SIGTERM/SIGINT (while a link is open, a default
disposition is replaced by a handler that raises) and at interpreter exit (atexit). Only a SIGKILL
leaves something behind: `ip netns list | grep '^lp[AB]-'`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

_LIVE: set[ShapedLink] = set()  # open links, closed at exit
_OLD_HANDLERS: dict = {}  # signal -> its handler before the first link opened
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def rate_bytes(rate: str) -> float:
    """A tc rate ("1gbit", "500mbit", "125mbps") in bytes per second."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)(bit|bps)\s*", rate.lower())
    if not m:
        raise ValueError(f"not a tc rate: {rate!r} (e.g. '1gbit', '10gbit', '125mbps')")
    return float(m[1]) * _UNITS[m[2]] / (8 if m[3] == "bit" else 1)


def default_burst(rate: str) -> int:
    """Bucket in bytes: 4 ms of `rate` (rate/HZ at HZ=250), at least 128 KiB so that a 64 KiB GSO
    super-packet always fits; a 4-64 KiB bucket held 1 Gbit/s down to 0.73-0.79 Gbit/s."""
    return int(max(128 * 1024, rate_bytes(rate) / 250))


def _cmd(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([shutil.which(argv[0]) or argv[0], *argv[1:]], capture_output=True,
                       text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed: {p.stderr.strip()[-300:]}")
    return p


@functools.lru_cache(maxsize=1)
def available() -> str | None:
    """None if ShapedLink can run here, else a one-sentence reason (cached)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux."
    if os.geteuid() != 0:
        return "creating network namespaces needs root."
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command (iproute2) is not installed."
    try:
        with ShapedLink(rate="1gbit"):
            pass
    except Exception as e:  # noqa: BLE001 - the reason is what the caller wants
        return f"a throwaway namespace pair joined by a tbf-shaped veth could not be made ({e})."
    return None


@contextlib.contextmanager
def _signals_held():
    """Hold SIGTERM/SIGINT (main thread) so no step is cut in half; they are delivered after it."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}) if main else None
    try:
        yield
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_on_signal(signum, _frame):
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def _read(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def _tail(f) -> str:
    return " | ".join(_read(f).strip().splitlines())[-400:] or "(empty)"


class ShapedLink:
    """Two namespaces joined by a veth pair, tbf-shaped to `rate` (a tc rate) in both directions."""

    def __init__(self, rate: str = "1gbit", burst: int | None = None, latency: str = "50ms"):
        self.rate, self.latency = rate, latency
        self.burst = burst if burst is not None else default_burst(rate)  # bytes
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces = [f"lpA-{tag}", f"lpB-{tag}"]
        short = tag.replace("-", "")[:12]  # interface names have at most 15 characters
        self.ifnames = [f"lv{short}a", f"lv{short}b"]
        net, host = secrets.randbelow(256), 4 * secrets.randbelow(64)  # a /30 of 10.213.0.0/16
        self.addresses = [f"10.213.{net}.{host + 1}", f"10.213.{net}.{host + 2}"]
        self._made: list[tuple[str, ...]] = []  # what this link made, in order
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> ShapedLink:
        try:
            with _signals_held():
                if not _LIVE and threading.current_thread() is threading.main_thread():
                    for sig in (signal.SIGTERM, signal.SIGINT):  # a caller's own handler stays
                        if signal.getsignal(sig) is signal.SIG_DFL:
                            _OLD_HANDLERS[sig] = signal.signal(sig, _raise_on_signal)
                _LIVE.add(self)
                self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        (a, b), (va, vb) = self.namespaces, self.ifnames
        for ns in (a, b):
            _cmd("ip", "netns", "add", ns)
            self._made.append(("netns", ns))
        _cmd("ip", "-n", a, "link", "add", va, "type", "veth", "peer", "name", vb, "netns", b)
        self._made.append(("link", a, va))
        for ns, dev, addr in zip(self.namespaces, self.ifnames, self.addresses, strict=True):
            _cmd("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            _cmd("ip", "-n", ns, "link", "set", "lo", "up")
            _cmd("ip", "-n", ns, "link", "set", dev, "up")
            _cmd("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                 "burst", str(self.burst), "latency", self.latency)

    def close(self) -> None:
        """Kill this link's ranks, delete its veth and namespaces (idempotent, ignores failures)."""
        try:
            with _signals_held():
                for p in self._procs:
                    if p.poll() is None:
                        p.kill()
                    p.wait()
                self._procs.clear()
                while self._made:
                    kind, *what = self._made.pop()
                    if kind == "link":  # both ends go
                        _cmd("ip", "-n", what[0], "link", "del", what[1], check=False)
                    else:
                        _cmd("ip", "netns", "del", what[0], check=False)
                _LIVE.discard(self)
        finally:  # after a held signal was raised: the last link open restores the handlers
            if not _LIVE:
                for sig, old in _OLD_HANDLERS.items():
                    if signal.getsignal(sig) is _raise_on_signal:
                        signal.signal(sig, old)
                _OLD_HANDLERS.clear()

    def qdisc_stats(self) -> list[dict]:
        """`tc -s -j` statistics of the tbf on each veth end (bytes, packets, drops, overlimits)."""
        out = []
        for ns, dev in zip(self.namespaces, self.ifnames, strict=True):
            q = json.loads(_cmd("tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev).stdout)
            out.append(next(d for d in q if d.get("kind") == "tbf"))
        return out

    def run_ranks(self, argv: list[str], *, env: dict | None = None, timeout_s: float) -> list[dict]:
        """Run rank 0 in namespace A and rank 1 in namespace B (env: os.environ, then `env`, then the
        torch.distributed variables); return the JSON object each printed as its last stdout line,
        in rank order. On a failed rank or the timeout both are killed and RuntimeError says why."""
        port = 20000 + secrets.randbelow(40000)  # the namespaces are new: any port is free
        files, procs = [], []
        try:
            for rank, (ns, dev) in enumerate(zip(self.namespaces, self.ifnames, strict=True)):
                e = {**os.environ, **(env or {}), "MASTER_ADDR": self.addresses[0],
                     "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": "2",
                     "LOCAL_RANK": "0", "GLOO_SOCKET_IFNAME": dev, "TP_SOCKET_IFNAME": dev,
                     "LAYERPAR_LINK_DEV": dev}  # a rank reads its own sent bytes (egress_bytes)
                files += [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
                with _signals_held():  # a started rank is always in self._procs
                    procs.append(subprocess.Popen(
                        [shutil.which("ip") or "ip", "netns", "exec", ns, *argv], env=e,
                        stdin=subprocess.DEVNULL, stdout=files[-2], stderr=files[-1]))
                    self._procs.append(procs[-1])
            deadline = time.monotonic() + timeout_s
            while None in (codes := [p.poll() for p in procs]) or any(codes):
                if bad := [r for r, c in enumerate(codes) if c]:
                    raise RuntimeError(f"rank {bad[0]} exited with code {codes[bad[0]]}; "
                                       f"stderr: {_tail(files[2 * bad[0] + 1])}")
                if time.monotonic() > deadline:
                    r = codes.index(None)
                    raise RuntimeError(f"ranks timed out after {timeout_s:g} s (rank {r} still "
                                       f"running); stderr: {_tail(files[2 * r + 1])}")
                time.sleep(0.05)
            results = []
            for r in (0, 1):
                last = (_read(files[2 * r]).strip().splitlines() or [""])[-1]
                try:
                    results.append(json.loads(last))
                except ValueError:
                    results.append(None)
                if not isinstance(results[-1], dict):
                    raise RuntimeError(f"rank {r}'s last stdout line is not a JSON object: "
                                       f"{last[-200:]!r}")
            return results
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                if p in self._procs:
                    self._procs.remove(p)
            for f in files:
                f.close()


def egress_bytes(dev: str) -> int:
    """Bytes the tbf qdisc on `dev` (in the caller's own namespace) has sent so far: what a rank
    inside a ShapedLink actually put on the shaped wire, every header included."""
    q = json.loads(_cmd("tc", "-s", "-j", "qdisc", "show", "dev", dev).stdout)
    return int(next(d for d in q if d.get("kind") == "tbf")["bytes"])


@atexit.register
def _close_all() -> None:
    for link in list(_LIVE):
        link.close()
