"""layerpar: a layer-parallel runtime for Para-Former networks."""

__version__ = "0.1.0"
