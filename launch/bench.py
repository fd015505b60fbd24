"""The runtime benchmark: dispatch overhead, two-worker speed-up, training throughput and depth
independence, measured in one run; the last stdout line is one JSON object.

    python launch/bench.py            # ~3 minutes on 2 CPU cores (local Ray, one thread per worker)
    python launch/bench.py --quick    # a smoke run
    python launch/bench.py --address auto
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback (docs/CLUSTER.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.bench.runtime_bench import cli_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
