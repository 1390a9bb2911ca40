"""koff: knowledge offloading — a sparse shared backbone plus swappable per-domain memories."""

__version__ = "0.1.0"


def load(folder, device: str = "cpu", dtype: str = "auto"):
    """Load an exported koff folder: a backbone plus its memories (see ``koff.runtime``)."""
    from koff.runtime import load as _load

    return _load(folder, device=device, dtype=dtype)
