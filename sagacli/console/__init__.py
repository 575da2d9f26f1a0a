"""``saga console``: a web page over the read model (sagas, one saga's time line, partitions,
dead letters) with a cancel action. No manager is asked, so it works while managers restart.

Stack: Starlette + Jinja2 templates rendered on the server, htmx (vendored in ``static/``,
htmx.org 2.0.11, 0BSD) polling the live parts, served by uvicorn. Threads and freshness:
:mod:`sagacli.console.backend`; pages: :mod:`sagacli.console.app`; the time line:
:mod:`sagacli.console.timeline`.
"""

from __future__ import annotations

from sagacli.console.app import create_app
from sagacli.console.backend import Backend, Settings

__all__ = ["Backend", "Settings", "create_app"]
