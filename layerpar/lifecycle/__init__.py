"""The Para-Former lifecycle: import the authors' weights, compress to a prefix model, expand with new
branches.

    layerpar import-reference STATE_DICT.pt --out RUN_DIR
    layerpar compress RUN_DIR --branches K --out RUN_DIR_K
    layerpar expand RUN_DIR --add M --out RUN_DIR_M --set data.name=digits
"""

from layerpar.lifecycle.common import LifecycleError
from layerpar.lifecycle.compress import compress
from layerpar.lifecycle.expand import expand
from layerpar.lifecycle.reference import import_reference

__all__ = ["LifecycleError", "compress", "expand", "import_reference"]
