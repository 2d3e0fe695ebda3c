"""The live fleet page (`--http`): a read-only aiohttp app in a thread of the server.

It only reads `FleetView.snapshot()`: `/` and `/static/*` are the page (package data in
`server/page`, no CDN), `/api/state` the snapshot as JSON, `/api/events` the snapshot again as
server-sent events whenever it changed (checked twice a second, so a busy round costs the
loop nothing more than the view's own bookkeeping). With a token every route wants
`Authorization: Bearer TOKEN`, or `?token=TOKEN`, which also sets a same-site cookie for the
page's own requests (a browser's script tags and EventSource cannot send headers).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from importlib import resources
from typing import Any

from aiohttp import web

from server.fleet_view import FleetView, split_address

log = logging.getLogger("heron.server")

ASSETS = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
EVENT_PERIOD_S = 0.5  # how often a connected page is checked for a new snapshot
COOKIE = "heron_page_token"  # set once /?token=TOKEN was accepted: the assets, the events
KEEPALIVE_S = 15.0  # an SSE comment at least this often, so proxies keep the stream open
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"}


def make_app(view: FleetView, token: str | None = None) -> web.Application:
    """The page's routes over `view` (read-only: GET and HEAD only)."""
    assets = {name: resources.files("server.page").joinpath(name).read_bytes()
              for name in ASSETS}
    stopping = asyncio.Event()

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if token is not None:
            given = request.query.get("token") or request.cookies.get(COOKIE, "")
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Bearer "):
                given = auth[len("Bearer "):]
            if not hmac.compare_digest(given.encode(), token.encode()):
                return web.json_response({"error": "missing or wrong token; help: send "
                                          "Authorization: Bearer TOKEN or open the page as "
                                          "/?token=TOKEN"}, status=401, headers=HEADERS)
        resp = await handler(request)
        resp.headers.update(HEADERS)
        if token is not None and "token" in request.query:  # the page's own requests
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
        return resp

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=assets["index.html"], content_type="text/html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=assets[name], content_type=ASSETS[name])

    async def state(request: web.Request) -> web.Response:
        return web.json_response(view.snapshot())

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **HEADERS})
        await resp.prepare(request)
        sent, quiet = -1, 0.0
        while not stopping.is_set():
            if view.version != sent:
                snap = view.snapshot()
                sent = snap["version"]
                await resp.write(f"data: {json.dumps(snap)}\n\n".encode())
                quiet = 0.0
            elif quiet >= KEEPALIVE_S:
                await resp.write(b": keepalive\n\n")
                quiet = 0.0
            try:
                await asyncio.wait_for(stopping.wait(), EVENT_PERIOD_S)
            except asyncio.TimeoutError:
                quiet += EVENT_PERIOD_S
        return resp

    async def on_shutdown(app: web.Application) -> None:
        stopping.set()

    app = web.Application(middlewares=[guard])
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/state", state)
    app.router.add_get("/api/events", events)
    return app


class FleetPage:
    """The app served from its own thread and event loop: `start()` returns the URL once it
    listens (or raises OSError, e.g. the port is taken), `stop()` closes it."""

    def __init__(self, view: FleetView, address: str, token: str | None = None) -> None:
        self.host, self.port = split_address(address)
        self.view = view
        self.token = token
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="heron-fleet-page",
                                        daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> str:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise OSError(f"--http {self.host}:{self.port}: cannot listen: {self._error}; "
                          "help: choose another port (0: any free one)") from self._error
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(10)

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start(), or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.exception("the fleet page stopped")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        runner = web.AppRunner(make_app(self.view, self.token), access_log=None,
                               shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
            if runner.addresses:  # the bound socket: the port when 0 was asked for
                self.port = runner.addresses[0][1]
            self._ready.set()
            await self._done.wait()
        finally:
            await runner.cleanup()
