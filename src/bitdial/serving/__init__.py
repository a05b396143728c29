"""The OpenAI-compatible server (``bitdial serve``, extra ``[serve]``: FastAPI + uvicorn).

* :mod:`~bitdial.serving.app` — the HTTP API: ``create_app(engine, ServerConfig(...))``;
* :mod:`~bitdial.serving.worker` — one generation at a time behind a bounded queue, with cancellation;
* :mod:`~bitdial.serving.precision` — the precision target per request and per step (controller wiring);
* :mod:`~bitdial.serving.schemas` / :mod:`~bitdial.serving.errors` — request bodies and OpenAI-style errors;
* :mod:`~bitdial.serving.metrics` — Prometheus text metrics.

Importing this package needs FastAPI only for :mod:`~bitdial.serving.app`; see ``docs/serving.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:  # lazy: keep `import bitdial.serving` free of FastAPI until needed
    if name in __all__:
        from bitdial.serving import app

        return getattr(app, name)
    raise AttributeError(name)
