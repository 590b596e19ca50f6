"""Assigners: which prediction learns from which ground-truth box."""
from .hungarian import HungarianMatcher

__all__ = ["HungarianMatcher"]
