"""``koff serve``: an OpenAI-compatible HTTP server over one exported backbone and its memories.

Needs the ``serve`` extra (fastapi, uvicorn).
"""

from koff.server.app import create_app
from koff.server.background import BackgroundServer

__all__ = ["BackgroundServer", "create_app"]
