"""Analysis tools from the Co-DETR paper: Hungarian matching instability across epochs and
encoder feature discriminability (IoF-IoB curves, heat maps). Plotting needs the optional
``analysis`` extra (matplotlib), imported only when a figure is drawn."""

from .discriminability import foreground_mask, iof_iob, level_norms, minmax_normalise, score_maps
from .instability import MatchingInstability, instability, last_layer_assignment, mean_instability

__all__ = ["MatchingInstability", "foreground_mask", "instability", "iof_iob", "last_layer_assignment",
           "level_norms", "mean_instability", "minmax_normalise", "score_maps"]
