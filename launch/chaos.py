"""Kill a branch worker with SIGKILL at a chosen moment, during serving or training (see
layerpar/runtime/chaos.py for every option).

    python launch/chaos.py --list
    python launch/chaos.py --rank 1 --after 10
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback (docs/CLUSTER.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.runtime.chaos import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
