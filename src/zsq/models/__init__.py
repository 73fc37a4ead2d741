from .preprocess import Preprocess
from .zoo import ZOO, DEFAULT_MODEL, ModelEntry, ModelInfo, load_model, zoo_table

__all__ = ["Preprocess", "ZOO", "DEFAULT_MODEL", "ModelEntry", "ModelInfo", "load_model", "zoo_table"]

from . import efficientnet_lite  # noqa: E402,F401  (registers efficientnet_lite0 into ZOO)
from . import vit  # noqa: E402,F401  (registers cifar10_vit_tiny into ZOO)
