"""The ranking server: a FastAPI app that shows items, takes rankings and writes them through the store.

FastAPI (on uvicorn) because the request bodies are checked by typed models (a bad body is a 422 naming
the field), ``fastapi.testclient`` drives the same app in-process for the API tests, and uvicorn is a
standard production ASGI server that runs the synchronous handlers in a thread pool; the store's locks
(:mod:`llmsys.rank.store`) make that safe. The page itself is plain HTML/CSS/JS shipped in ``static/``:
no build step, and nothing loads from anywhere but this server.

**Endpoints.** ``GET /`` the ranking page, ``GET /compare`` the stages side by side; ``GET /api/next?annotator=``
the annotator's first item not yet decided (or null when all are) with their progress; ``POST /api/submit``
``{"annotator", "item", "action": "rank"|"skip"|"flag", "ranking": [best, ..., worst], "shown", "reason"}``;
``GET /api/compare`` the side-by-side data; ``GET /api/health``. Errors are ``{"error": "..."}``: 404 for an
unknown item, 409 for a second decision on an item, 422 for a bad body (a ranking that is not a permutation
of the item's response indices, a missing annotator); none of them writes anything.

**Security defaults.** Model output is data: every string goes out as JSON and the page puts it into the
document with ``textContent`` only; the Content-Security-Policy allows scripts from this server's own files
alone, so even markup that slipped through could not run an inline script. Without a token the app answers
only requests addressed to a loopback name (``Host: 127.0.0.1``/``localhost``/``[::1]``), which also stops
DNS-rebinding pages from reaching it; ``serve`` refuses to bind anything but loopback without ``--token``.
With a token every request needs it: ``Authorization: Bearer <token>``, or ``?token=`` once (the reply sets
an HttpOnly, SameSite=Strict cookie that carries it afterwards).
"""
from __future__ import annotations

import hashlib
import random
import secrets
import unicodedata
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from llmsys.rank.candidates import Item
from llmsys.rank.store import DuplicateDecision, RankingStore, utc_now

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "llmsys_rank_token"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
MAX_ANNOTATOR_CHARS = 64
MAX_REASON_CHARS = 500

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a ?token= must not leak to another site
    "Cache-Control": "no-store",
}


class Submission(BaseModel):
    """The body of ``POST /api/submit``."""

    model_config = ConfigDict(extra="forbid")

    annotator: StrictStr
    item: StrictStr
    action: Literal["rank", "skip", "flag"] = "rank"
    ranking: list[StrictInt] | None = None
    shown: list[StrictInt] | None = None
    reason: StrictStr | None = None


def check_annotator(name: str | None) -> str:
    """The annotator's name, stripped; a 422 unless it is 1-64 printable characters."""
    name = (name or "").strip()
    if not name or len(name) > MAX_ANNOTATOR_CHARS or any(unicodedata.category(c)[0] == "C" for c in name):
        raise HTTPException(422, f"annotator {name[:80]!r}: expected a name of 1 to {MAX_ANNOTATOR_CHARS} "
                                 f"printable characters (enter one on the page, or ?annotator=NAME)")
    return name


def display_order(annotator: str, item: Item) -> list[int]:
    """The order one annotator sees an item's responses in: shuffled against position bias, the same on
    every visit (seeded by annotator and item)."""
    seed = int.from_bytes(hashlib.sha256(f"{annotator}\0{item.id}".encode()).digest()[:8], "big")
    order = list(range(len(item.responses)))
    random.Random(seed).shuffle(order)
    return order


def _permutation(values: Sequence[int] | None, k: int, field: str) -> list[int]:
    if values is None or sorted(values) != list(range(k)):
        raise HTTPException(422, f"field {field} is {values!r}; expected a permutation of 0..{k - 1} (indices of "
                                 f"the item's {k} responses, best first)")
    return list(values)


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=SECURITY_HEADERS)


def create_app(items: Sequence[Item], store: RankingStore | None, *, compare: dict[str, Any] | None = None,
               token: str | None = None, allowed_hosts: Collection[str] | None = LOOPBACK_NAMES) -> FastAPI:
    """The app over ``items`` (empty: only the compare page), writing to ``store``. ``allowed_hosts``: the
    ``Host`` names answered (None: any, for a token-protected server)."""
    if items and store is None:
        raise ValueError("items to rank need a store to write the rankings to")
    by_id = {item.id: item for item in items}
    app = FastAPI(title="llmsys rank", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts is not None and _host_name(request.headers.get("host", "")) not in allowed_hosts:
            return _error(400, f"Host {request.headers.get('host')!r} is not answered: this server serves "
                               f"{', '.join(sorted(allowed_hosts))} only (start it with --token to serve others)")
        from_query = request.query_params.get("token")
        if token is not None:
            auth = request.headers.get("authorization", "")
            given = (auth[7:] if auth.lower().startswith("bearer ") else None) \
                or request.cookies.get(TOKEN_COOKIE) or from_query or ""
            if not secrets.compare_digest(given.encode(), token.encode()):
                return _error(401, "this server needs its token: open the page as /?token=TOKEN "
                                   "(or send Authorization: Bearer TOKEN)")
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if token is not None and from_query:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"][1:]) or "body"
        return _error(422, f"field {field}: {first['msg']}")

    def progress(annotator: str) -> dict[str, Any]:
        decided = store.decisions(annotator) if store is not None else {}
        counts = {"rank": 0, "skip": 0, "flag": 0}
        for item_id, decision in decided.items():
            if item_id in by_id:
                counts[decision.action] += 1
        nxt = next((item for item in items if item.id not in decided), None)
        shown = None
        if nxt is not None:
            order = display_order(annotator, nxt)
            shown = {"id": nxt.id, "messages": nxt.messages, "responses": list(nxt.responses),
                     "tokens": list(nxt.tokens) if nxt.tokens else None,
                     "stopped": list(nxt.stopped) if nxt.stopped else None, "shown": order}
        return {"annotator": annotator, "item": shown,
                "progress": {"total": len(items), "ranked": counts["rank"], "skipped": counts["skip"],
                             "flagged": counts["flag"], "decided": sum(counts.values())}}

    def need_items() -> None:
        if not items:
            raise HTTPException(404, "this server has no items to rank (started with --compare only); see /compare")

    @app.get("/", include_in_schema=False)
    def rank_page() -> FileResponse:
        return FileResponse(STATIC / "rank.html", media_type="text/html")

    @app.get("/compare", include_in_schema=False)
    def compare_page() -> FileResponse:
        return FileResponse(STATIC / "compare.html", media_type="text/html")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"items": len(items), "compare": compare is not None}

    @app.get("/api/next")
    def next_item(annotator: str | None = None) -> dict[str, Any]:
        need_items()
        return progress(check_annotator(annotator))

    @app.post("/api/submit")
    def submit(body: Submission) -> dict[str, Any]:
        need_items()
        annotator = check_annotator(body.annotator)
        item = by_id.get(body.item)
        if item is None:
            raise HTTPException(404, f"unknown item {body.item[:80]!r}: not among the {len(items)} items served here")
        k = len(item.responses)
        shown = _permutation(body.shown, k, "shown") if body.shown is not None else None
        if body.reason is not None and len(body.reason) > MAX_REASON_CHARS:
            raise HTTPException(422, f"field reason has {len(body.reason)} characters; at most {MAX_REASON_CHARS}")
        row: dict[str, Any] = {"prompt": item.prompt, "responses": list(item.responses)}
        if body.action == "rank":
            if body.reason is not None:
                raise HTTPException(422, "field reason is for a skip or a flag; a ranking has none")
            row["ranking"] = _permutation(body.ranking, k, "ranking")
        elif body.ranking is not None:
            raise HTTPException(422, f"field ranking was given with action {body.action!r}; a skipped or flagged "
                                     f"item is not ranked")
        row.update(action=body.action, item=item.id, annotator=annotator, time=utc_now(), model=item.model,
                   sampling=item.sampling)
        if body.action == "rank":
            row.update(tokens=list(item.tokens) if item.tokens else None,
                       stopped=list(item.stopped) if item.stopped else None)
        else:
            row["reason"] = body.reason.strip() if body.reason else None
        row["shown"] = shown
        try:
            store.append(row)
        except DuplicateDecision as err:
            raise HTTPException(409, str(err)) from None
        return {"saved": {"item": item.id, "action": body.action}, **progress(annotator)}

    @app.get("/api/compare")
    def compare_data() -> dict[str, Any]:
        if compare is None:
            raise HTTPException(404, "no side-by-side file: start the server with --compare <out>/side_by_side.json")
        return compare

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
