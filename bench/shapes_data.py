"""Moved to :mod:`dsrewrite.shapes.data` (the demo ships it); kept for the benchmarks' imports."""

from dsrewrite.shapes.data import CLASSES, NUM_CLASSES, confusion, make_shapes, miou

__all__ = ["make_shapes", "CLASSES", "NUM_CLASSES", "miou", "confusion"]
