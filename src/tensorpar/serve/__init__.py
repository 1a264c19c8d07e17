"""The OpenAI-compatible HTTP server of ``tensorpar serve``, on rank 0 of a ``ServingEngine`` (or of
replica 0 of a ``ReplicaSet``: any ``ServingBackend``).

``create_app(engine, api_key)`` builds the FastAPI app; ``run_server(engine, host, port, api_key)``
serves it with uvicorn until SIGINT/SIGTERM, then shuts the engine down.
"""

from tensorpar.serve.app import create_app
from tensorpar.serve.server import run_server

__all__ = ["create_app", "run_server"]
