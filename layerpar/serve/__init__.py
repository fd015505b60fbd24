"""gRPC serving (layerpar.v1): codec, dynamic batcher, server, client, prediction CLI and benchmark.

Imports nothing heavy: `from layerpar.serve.server import ServerThread`, `from layerpar.serve.client
import Client`.
"""
