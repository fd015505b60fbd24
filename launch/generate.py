"""Generate text from a language model checkpoint (one process, or its branches over W Ray workers).

    python launch/generate.py --checkpoint runs/<run> --prompt "def main(" --max-tokens 64 --greedy
    python launch/generate.py --checkpoint runs/<run> --prompt "import " --max-tokens 64 \
        --temperature 0.8 --top-k 40 --seed 1 --stop "\n\n"
    python launch/generate.py --checkpoint runs/<run> --prompt "class " --max-tokens 32 --greedy --workers 2
    python launch/generate.py --config stdlib_lm --prompt "x = " --max-tokens 8 --greedy   # untrained

The text goes to stderr as it is made; the last stdout line is ONE JSON object holding `text` (and
tokens, stop_reason, per-token ms). Bad input is one sentence and exit 2. Same as `layerpar generate`
(layerpar/serve/generate_cli.py; `--help` for every option).
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray stays on loopback (docs/CLUSTER.md)
os.environ.setdefault("RAY_AUTH_MODE", "token")

from layerpar.serve.generate_cli import generate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate_main(sys.argv[1:]))
