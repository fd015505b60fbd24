"""The shaped-link harness: two gloo ranks in two network namespaces joined by a tbf-shaped veth pair
agree on an all_reduce, their bytes cross the shaped veth, and every namespace and link the harness
made is gone afterwards: after a normal exit, after a failing rank, and after SIGTERM. Needs root,
iproute2 and tbf; skipped with the reason elsewhere.

    .venv/bin/python -m pytest -q tests/bench/test_netns.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerpar.bench.netns import ShapedLink, available

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
BIG = 8 * 2**20  # bytes per large all_reduce
REPS = 3

RANK = f"""
import json, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="env://")
r, w = dist.get_rank(), dist.get_world_size()
t = torch.arange(4, dtype=torch.float64) + 10 * r
dist.all_reduce(t)
x = torch.empty({BIG} // 4)
ok = True
for _ in range({REPS}):
    x.fill_(r + 1.0)
    dist.all_reduce(x)
    ok = ok and bool((x == 3.0).all())
dist.destroy_process_group()
print("some output before the result")
print(json.dumps({{"rank": r, "world": w, "sum": t.tolist(), "big_ok": ok, "bytes": {BIG * REPS}}}))
"""


@pytest.fixture(autouse=True)
def _needs_netns():
    reason = available()
    if reason is not None:
        pytest.skip(reason)


def _exist(link_names, ifnames) -> list[str]:
    """Which of these namespaces (ip netns list) or links (ip link, here and in them) exist now."""
    ns = {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}
    links = _ip("-o", "link").split()
    for n in ns & set(link_names):
        links += _ip("-n", n, "-o", "link").split()
    return sorted(set(link_names) & ns) + sorted(i for i in ifnames if any(i in t for t in links))


def _ip(*args) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_allreduce_across_shaped_link(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    with ShapedLink(rate="1gbit") as link:
        names, ifnames = list(link.namespaces), list(link.ifnames)
        assert _exist(names, ifnames) == sorted(names) + sorted(ifnames)
        assert link.rate == "1gbit" and len(set(link.addresses)) == 2
        res = link.run_ranks([sys.executable, str(script)], env={"OMP_NUM_THREADS": "1"},
                             timeout_s=240)
        stats = link.qdisc_stats()
    expected = [2.0 * i + 10.0 for i in range(4)]
    assert [r["rank"] for r in res] == [0, 1]
    for r in res:
        assert r["world"] == 2 and r["sum"] == expected and r["big_ok"] is True
    # every byte between the ranks went out through a tbf on a veth end, in both directions
    assert all(q["kind"] == "tbf" and q["bytes"] >= BIG * REPS for q in stats)
    assert _exist(names, ifnames) == []


def test_failing_rank_raises_and_cleans_up():
    code = ("import os, sys, time\n"
            "if os.environ['RANK'] == '1':\n"
            "    print('rank one gives up', file=sys.stderr); sys.exit(3)\n"
            "time.sleep(600)\n")
    with pytest.raises(RuntimeError, match=r"rank 1 exited with code 3.*rank one gives up"):
        with ShapedLink(rate="10gbit") as link:
            names, ifnames = list(link.namespaces), list(link.ifnames)
            link.run_ranks([sys.executable, "-c", code], timeout_s=200)
    assert _exist(names, ifnames) == []


SLEEPER = """
import os, sys, time
open(sys.argv[1] + os.environ["RANK"], "w").write(str(os.getpid()))
time.sleep(600)
"""

HARNESS = """
import json, sys
from layerpar.bench.netns import ShapedLink
with ShapedLink() as link:
    print(json.dumps([link.namespaces, link.ifnames]), flush=True)
    link.run_ranks([sys.executable, "-c", sys.argv[1], sys.argv[2]], timeout_s=500)
"""


def test_sigterm_kills_ranks_and_cleans_up(tmp_path):
    pidfile = tmp_path / "rank"
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, SLEEPER, str(pidfile)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        names, ifnames = json.loads(proc.stdout.readline())
        pids = []
        for r in (0, 1):  # wait until both ranks run (bounded only by the test's timeout)
            f = Path(f"{pidfile}{r}")
            while not (f.exists() and f.read_text()):
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.05)
            pids.append(int(f.read_text()))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _exist(names, ifnames) == []
    for pid in pids:  # killed and reaped by the harness
        assert not os.path.exists(f"/proc/{pid}")
