"""The HTTP side of ``onestep serve``: a Starlette app with the page, its static files and a small JSON API.

Routes:

- ``GET /``: the page; ``GET /static/...``: its script and style sheet (nothing comes from a CDN).
- ``GET /api/info``: classes, served runs and the missing ones, panels, ranges, the bench's FIDs, the machine.
- ``POST /api/generate`` ``{"class": int | "random", "seed": int, "k": int}``: a stream of JSON lines
  (``application/x-ndjson``): ``start``; one ``image`` per one-step panel (DD1 1 step, DD2 1 step, DD2 1 step + k
  teacher steps); the teacher's ``frame`` after each AR step (a partial decode), then its ``image``; ``done`` with
  every latency and speed-up against the teacher, all measured on the server in this request.
- ``POST /api/walk`` ``{"method": "dd1" | "mapkd" | "dd2", "class": int, "seed_a": int, "seed_b": int, "t": 0..1}``: one
  image of the latent walk between two noise seeds.
- ``POST /api/throughput`` ``{"k": int}``: images per second at batch 1 and 64 of every panel, timed side by side.

Bad input (unknown class or method, seed / k / t out of range, malformed JSON at any depth, unknown fields) gets HTTP
400 with ``{"error": message}``; the server keeps serving. A request whose ``Host`` header is not the server's own
address (the bound one, localhost, 127.0.0.1 or [::1], with the port) gets 403: a page of another site that a DNS
rebinding points at 127.0.0.1 reaches no model. The work of a generate request whose client went away is cancelled
(at the next panel or teacher step), so abandoned requests do not delay the next one.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from onestep.serve.models import SEED_MAX, Models, data_url

STATIC = Path(__file__).parent / "static"


class BadRequest(ValueError):
    """A request the API refuses with HTTP 400."""


class Cancelled(Exception):
    """The client of a generate request went away: its remaining work is dropped."""


WILDCARD = ("", "0.0.0.0", "::")


class HostGuard:
    """ASGI middleware: HTTP 403 for a request whose ``Host`` header is not this server's. Allowed: localhost,
    127.0.0.1, [::1] and the bound address, each with the bound port (bare when the port is 80); bound to every
    interface (0.0.0.0, ::), also this machine's names and any IP address. A DNS-rebinding page sends its own domain
    name, which is never allowed."""

    def __init__(self, app, host: str, port: int):
        self.app, self.port, self.wildcard = app, port, host in WILDCARD
        names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
        if self.wildcard:
            names |= {socket.gethostname(), socket.getfqdn()}
        self.allowed = {f"{n.lower()}:{port}" for n in names} | ({n.lower() for n in names} if port == 80 else set())

    def ok(self, host: str) -> bool:
        host = host.strip().lower()
        if host in self.allowed:
            return True
        name, _, port = host.rpartition(":") if host.rfind(":") > host.rfind("]") else (host, "", "80")
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False
        return self.wildcard and port == str(self.port)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not self.ok(host):
                msg = f"Host {host!r} is not this server's address: refused (DNS rebinding protection)"
                return await JSONResponse({"error": msg}, status_code=403)(scope, receive, send)
        await self.app(scope, receive, send)


async def _body(request: Request, allowed: set[str]) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise BadRequest(f"malformed JSON: {what}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; the fields are {', '.join(sorted(allowed))}")
    return body


def _int(body: dict, name: str, lo: int, hi: int, default: int | None = None) -> int:
    v = body.get(name, default)
    if v is None:
        raise BadRequest(f"{name} is required")
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{name} must be an integer, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise BadRequest(f"{name} {v} is out of range: {lo}..{hi}")
    return v


def _class(body: dict, models: Models, allow_random: bool) -> tuple[int, bool]:
    v = body.get("class", "random" if allow_random else None)
    if allow_random and v == "random":
        return random.randrange(models.num_classes), True
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < models.num_classes:
        what = ', or "random"' if allow_random else ""
        raise BadRequest(f"unknown class {json.dumps(v)}: the classes are 0..{models.num_classes - 1}{what}")
    return v, False


def _k(body: dict, models: Models) -> int:
    if models.k_max == 0:
        if body.get("k", 0) not in (0, None):
            raise BadRequest("k (DD2's teacher steps) needs a served DD2 run")
        return 0
    return _int(body, "k", 1, models.k_max, default=min(3, models.k_max))


def build_app(models: Models, workers: int = 16, host: str | None = None, port: int | None = None) -> Starlette:
    """The app serving ``models``; model calls run on a thread pool of ``workers`` (they queue on the models'
    lock), so the event loop keeps answering while one runs. With ``host`` and ``port`` (the bound address), requests
    for another host are refused (:class:`HostGuard`). ``app.state.counts``: "abandoned", the generate streams whose
    client went away; "cancelled", those whose work stopped early because of it."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onestep-serve")
    counts = {"abandoned": 0, "cancelled": 0}

    async def in_pool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def bad(e: Exception) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def info(request: Request):
        return JSONResponse(models.info())

    async def generate(request: Request):
        try:
            body = await _body(request, {"class", "seed", "k"})
            label, randomized = _class(body, models, allow_random=True)
            seed = _int(body, "seed", 0, SEED_MAX, default=0)
            k = _k(body, models)
        except BadRequest as e:
            return bad(e)
        panels = models.panels(k)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()  # the client went away: the work stops at its next event

        def put(ev):
            if gone.is_set():
                raise Cancelled
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        def work():
            try:
                lat = {}
                for p in panels:
                    if p.key == "teacher":
                        continue
                    if gone.is_set():
                        raise Cancelled
                    img, dt = models.one_step(p, label, seed)
                    lat[p.key] = dt
                    put({"type": "image", **p.__dict__, "image": data_url(img), "latency_s": dt})
                if models.teacher is not None:
                    tp = panels[0]
                    img, dt = models.teacher_stream(
                        label, seed, lambda k_, im: put({"type": "frame", "key": "teacher", "step": k_ + 1,
                                                         "of": models.teacher_steps, "image": data_url(im)}))
                    lat["teacher"] = dt
                    put({"type": "image", **tp.__dict__, "image": data_url(img), "latency_s": dt})
                ref = lat.get("teacher")
                put({"type": "done", "latency_s": lat,
                     "speedup": {k_: (ref / v if ref else None) for k_, v in lat.items()}})
            except Cancelled:
                counts["cancelled"] += 1
            except Exception as e:  # a fault inside a model: reported in the stream, the server keeps serving
                with contextlib.suppress(Cancelled):
                    put({"type": "error", "error": f"{type(e).__name__}: {e}"})
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        async def stream():
            finished = False
            try:
                yield json.dumps({"type": "start", "class": label, "class_name": models.classes[label],
                                  "random_class": randomized, "seed": seed, "k": k,
                                  "panels": [p.__dict__ for p in panels], "missing": models.missing}) + "\n"
                fut = loop.run_in_executor(pool, work)
                while True:
                    ev = await queue.get()
                    if ev is None:
                        break
                    yield json.dumps(ev) + "\n"
                await fut
                finished = True
            finally:  # a client that went away cancels the stream here (Starlette cancels it on http.disconnect)
                if not finished:
                    gone.set()
                    counts["abandoned"] += 1

        return StreamingResponse(stream(), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def walk(request: Request):
        try:
            body = await _body(request, {"method", "class", "seed_a", "seed_b", "t"})
            key = body.get("method")
            if key not in models.one_step_keys:
                served = ", ".join(models.one_step_keys) or "none"
                raise BadRequest(f"unknown method {json.dumps(key)}: the served one-step generators are {served}")
            label, _ = _class(body, models, allow_random=False)
            seed_a = _int(body, "seed_a", 0, SEED_MAX)
            seed_b = _int(body, "seed_b", 0, SEED_MAX)
            t = body.get("t")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
                raise BadRequest(f"t must be a number in [0, 1], got {json.dumps(t)}")
        except BadRequest as e:
            return bad(e)
        img, dt = await in_pool(models.walk, key, label, seed_a, seed_b, float(t))
        return JSONResponse({"method": key, "class": label, "seed_a": seed_a, "seed_b": seed_b, "t": t,
                             "image": data_url(img), "latency_s": dt})

    async def throughput(request: Request):
        try:
            body = await _body(request, {"k"})
            k = _k(body, models)
        except BadRequest as e:
            return bad(e)
        return JSONResponse(await in_pool(models.throughput, k))

    routes = [Route("/", index), Route("/api/info", info), Route("/api/generate", generate, methods=["POST"]),
              Route("/api/walk", walk, methods=["POST"]), Route("/api/throughput", throughput, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        pool.shutdown(wait=False)

    guard = [Middleware(HostGuard, host=host, port=port)] if host is not None and port is not None else []
    app = Starlette(routes=routes, lifespan=lifespan, max_body_size=1 << 16, middleware=guard)
    app.state.models = models
    app.state.counts = counts
    return app
