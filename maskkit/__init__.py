"""maskkit: efficient masked and self-supervised pretraining of Transformers."""

from maskkit.errors import MaskkitError

__version__ = "0.1.0"
__all__ = ["MaskkitError", "__version__"]
