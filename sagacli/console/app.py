"""The console's web application: Starlette routes rendering Jinja2 templates, htmx for the live parts.

Every page is a full server-rendered HTML page (it works without JavaScript, refreshed by
hand); htmx (vendored in ``static/``, no CDN, no build step) polls each page's live region every
``poll_s`` seconds and swaps in the same route's fragment (a request with ``HX-Request`` gets
the fragment, anything else the page). Routes:

* ``/sagas`` the list: filters (status, type, started within / from / to, text in the id, an
  open incident), counts by status, newest first;
* ``/sagas/{id}`` one saga: time line, steps, payload and outputs, raw log records; while it
  runs, a cancel button (``POST /sagas/{id}/cancel``: ``SagaClient.cancel``, the rules of
  ``saga cancel``); for an open incident, retry and resolve (``POST /sagas/{id}/retry|resolve``:
  ``SagaClient.retry`` / ``resolve``, the rules of ``saga retry`` / ``saga resolve``);
* ``/partitions`` owners, epochs, last takeovers, lag; ``/dead-letters`` newest first;
* ``/healthz`` JSON for scripts and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from sagacli.console import queries
from sagacli.console.backend import Backend, Settings
from sagalog.errors import BrokerError, ConfigError

HERE = Path(__file__).resolve().parent
MAX_REASON = 500
ACTIONS = ("cancel", "retry", "resolve")


def _clock(ms: int | None) -> str:
    return "" if ms is None else datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S.%f")[:-3]


def _datetime(ms: int | None) -> str:
    return "" if ms is None else datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _duration(ms: int | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 120_000:
        return f"{ms / 1000:.2f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.1f} min"
    return f"{ms / 3_600_000:.1f} h"


def _ago(ms: int | None, now_ms: int | None = None) -> str:
    if ms is None:
        return ""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    return f"{_duration(max(0, now_ms - ms))} ago"


def templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(clock=_clock, datetime=_datetime, duration=_duration, ago=_ago, urlquote=quote)
    env.globals.update(statuses=queries.STATUSES, within_choices=queries.WITHIN, timezone=time.strftime("%Z"))
    return Jinja2Templates(env=env)


def _is_fragment(request: Request) -> bool:
    """htmx asking for the live region (not a boosted navigation or a history restore)."""
    h = request.headers
    return h.get("hx-request") == "true" and not h.get("hx-boosted") and not h.get("hx-history-restore-request")


def _same_origin(request: Request) -> bool:
    """A form post must come from a page of this console (a browser sends Origin on POST)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    return urlsplit(source).netloc == request.headers.get("host")


def create_app(settings: Settings, backend: Backend | None = None) -> Starlette:
    """The console for one deployment. ``backend``: for tests; made from ``settings`` otherwise."""
    tpl = templates()
    state: dict[str, Backend] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["backend"] = backend or Backend(settings)
        try:
            yield
        finally:
            await state["backend"].close()

    def be() -> Backend:
        return state["backend"]

    def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        base = {
            "settings": settings,
            "health": be().health(),
            "poll_s": settings.poll_s,
            "now_ms": int(time.time() * 1000),
            "page": "",
            "notice": None,
            "notice_kind": "ok",
        }
        return tpl.TemplateResponse(request, name, {**base, **context}, status_code=status_code)

    async def home(request: Request) -> Response:
        return RedirectResponse("/sagas", status_code=302)

    async def sagas(request: Request) -> Response:
        filters = queries.Filters.parse(request.query_params)
        fragment = _is_fragment(request)
        await be().fresh("log")
        data = await be().query(queries.sagas_page, filters, with_types=not fragment)
        context = {"page": "sagas", "filters": filters, **data}
        return render(request, "_sagas_table.html" if fragment else "sagas.html", context)

    async def saga(request: Request) -> Response:
        from sagalog.readmodel import SagaNotFound

        saga_id = request.path_params["saga_id"]
        fragment = _is_fragment(request)
        await be().fresh("log")
        try:
            data = await be().query(queries.saga_page, saga_id)
            status = 200
        except SagaNotFound as err:  # the page stays, and polls: a saga just started appears once begun
            data, status = {"state": None, "message": str(err), "actions_key": "none"}, 404
        context = {
            "page": "sagas",
            "saga_id": saga_id,
            "notice": request.query_params.get("notice"),
            "notice_kind": request.query_params.get("kind", "ok"),
            "oob": fragment,
            "actions_changed": request.query_params.get("actions") != data["actions_key"],
            **data,
        }
        return render(request, "_saga_live.html" if fragment else "saga.html", context, status)

    async def act(request: Request) -> Response:
        """Cancel a running saga, or answer an incident (retry, resolve): ``SagaClient``'s rules."""
        from sagalog.readmodel import SagaNotFound

        saga_id, action = request.path_params["saga_id"], request.path_params["action"]
        if action not in ACTIONS:
            return Response(f"no such action {action!r}; one of {', '.join(ACTIONS)}", status_code=404)
        if not _same_origin(request):
            return Response("cross-origin request refused", status_code=403)
        form = await request.form()

        def field(name: str) -> str:
            return " ".join(str(form.get(name) or "").split())[:MAX_REASON]

        reason, step, operator = field("reason"), field("step") or None, field("operator") or None
        status, kind = 200, "ok"
        try:
            if action == "cancel":
                reason = reason or "cancelled by operator"
                await be().act("cancel", saga_id, reason=reason)
                message = f"cancel requested for saga {saga_id} ({reason}); it compensates what it did"
            elif action == "retry":
                reason = reason or "retried by operator"
                await be().act("retry", saga_id, step=step, operator=operator, reason=reason)
                message = f"retry requested for saga {saga_id}{f' step {step}' if step else ''}: the compensation runs again"
            elif not step:
                status, kind, message = 400, "error", "resolving an incident needs the step (the form's 'step' field)"
            else:  # an empty reason is refused by the client, in the words of 'saga resolve'
                await be().act("resolve", saga_id, step=step, operator=operator, reason=reason)
                message = f"resolve requested for saga {saga_id} step {step}: it counts as compensated"
        except SagaNotFound as err:
            status, kind, message = 404, "error", str(err)
        except BrokerError as err:
            status, kind, message = 503, "error", str(err)
        except ConfigError as err:  # what 'saga cancel' / 'retry' / 'resolve' refuse, in their words
            status, kind, message = 409, "error", str(err)
        if _is_fragment(request):
            response = render(request, "_flash.html", {"notice": message, "notice_kind": kind}, status)
            if status == 200:
                response.headers["HX-Trigger"] = "saga-changed"
            return response
        target = f"/sagas/{quote(saga_id, safe='')}?" + urlencode({"notice": message, "kind": kind})
        return RedirectResponse(target, status_code=303)

    async def partitions(request: Request) -> Response:
        fragment = _is_fragment(request)
        # Both rounds run on the broker thread one after the other; the page waits for them together.
        _, offsets_round = await asyncio.gather(be().fresh("log"), be().fresh("offsets"))
        offsets = offsets_round.result
        error = offsets_round.error if not offsets_round.ok else (offsets.error if offsets else None)
        data = await be().query(queries.partitions_page, offsets, be().health().stale)
        context = {"page": "partitions", "offsets_error": error, **data}
        return render(request, "_partitions_table.html" if fragment else "partitions.html", context)

    async def dead_letters(request: Request) -> Response:
        fragment = _is_fragment(request)
        try:
            limit = min(5000, max(1, int(request.query_params.get("limit", "200"))))
        except ValueError:
            limit = 200
        r = await be().fresh("dead-letters")
        result = r.result
        letters = list(result.letters[:limit]) if result is not None else []
        known = await be().query(queries.known_sagas, sorted({x.key for x in letters if x.key}))
        context = {
            "page": "dead-letters",
            "letters": letters,
            "total": result.total if result is not None else None,
            "topic_exists": result.topic_exists if result is not None else True,
            "read_ms": result.read_ms if result is not None else None,
            "error": None if r.ok else r.error,
            "known": known,
            "limit": limit,
        }
        return render(request, "_dead_letters_table.html" if fragment else "dead_letters.html", context)

    async def healthz(request: Request) -> Response:
        await be().fresh("log")
        health = be().health()
        counts = await be().query(lambda model: {k.value: v for k, v in model.counts_by_status().items()})
        return JSONResponse(
            {
                "ok": health.error is None,
                "error": health.error,
                "stale": health.staleness,
                "caught_up_ms": health.caught_up_ms,
                "log": settings.topics.log,
                "bootstrap": settings.bootstrap,
                "counts": counts,
            },
            status_code=200 if health.error is None else 503,
        )

    routes = [
        Route("/", home),
        Route("/sagas", sagas),
        Route("/sagas/{saga_id}", saga),
        Route("/sagas/{saga_id}/{action:str}", act, methods=["POST"]),
        Route("/partitions", partitions),
        Route("/dead-letters", dead_letters),
        Route("/healthz", healthz),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
