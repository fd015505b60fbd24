"""Send the test split of the served model's dataset to a layerpar server and print its accuracy.

    python launch/predict.py --address 127.0.0.1:50051
    python launch/predict.py --address 127.0.0.1:50051 --num-branches 2 --limit 500 --batch-size 32
    python launch/predict.py --address host:50051 --token "$TOKEN" --tls-ca cert.pem

The dataset is the one in the server's config (ModelInfo); --set data.root=... points at local files.
The last stdout line is one JSON object (accuracy, rows, rows_per_s, ...). Same as `layerpar predict`.
Exit 2, with one sentence, when the server refuses the input (e.g. values that overflow the model, a
wrong token); exit 1 when it cannot be reached.
"""

import sys

from layerpar.serve.predict import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
