"""koff: knowledge offloading — a sparse shared backbone plus swappable per-domain memories."""

__version__ = "0.1.0"
