"""codetr: Co-DETR (DETRs with Collaborative Hybrid Assignments Training) in PyTorch."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (loads the compiled extension, or warns once)

__all__ = ["ops", "__version__"]
