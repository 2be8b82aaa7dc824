"""``onestep serve``: a local web page where the AR teacher and the one-step generators draw side by side.

The teacher's image is streamed as it is generated, one partial decode per AR step, while DD1's and DD2's one-step
images appear at once beside it; under each image, its latency measured on the server in the same request and the
speed-up against the teacher. The page also shows the bench's FIDs, a latent walk per one-step generator and a
throughput panel (images per second at batch 1 and 64 on this machine, and the cost of a million images).

The framework is Starlette on uvicorn. The page is one small HTML file with its own script, so what it needs from a
framework is routing, static files and a streamed response, which Starlette gives with few dependencies (anyio,
uvicorn's h11). Gradio, the convention of the LlamaGen and MAR demos, brings a large front-end bundle and its own
layout; FastAPI's validation answers 422, where this API answers bad input with 400 and a message of its own.
Every asset is served from ``onestep/serve/static``: the page loads nothing from a CDN and works offline.
"""
from __future__ import annotations

import socket

from onestep.serve.models import KINDS, Models, default_runs, resolve_runs

__all__ = ["default_runs", "open_socket", "serve"]


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); ValueError with one line when the port is in use or the host is not an
    address of this machine (bound here, before uvicorn starts, so that the error is one line)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise ValueError(f"port {port} on {host} is in use; pass another --port (0 picks a free one)") from None
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def serve(run: list[str] | None, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> bool:
    """Serve the page on ``host``:``port`` until interrupted: the runs of ``run`` (teacher, DD1 or DD2 run
    directories; a kind not given: the shipped run) on ``device``. Returns whether the server started."""
    try:  # starlette and uvicorn are optional (only the server needs them): imported when it starts
        import uvicorn

        from onestep.serve.app import build_app
    except ImportError as e:
        raise ValueError(f"onestep serve needs starlette and uvicorn ({e}): pip install -r requirements.txt") from None

    runs = resolve_runs(run)
    sock = open_socket(host, port)  # before loading: a port in use fails at once
    for kind in KINDS:
        where = runs[kind] if runs[kind] is not None else "MISSING (not shipped in assets/fashion-mnist and no --run)"
        print(f"onestep serve: {kind}: {where}", flush=True)
    models = Models(runs, device=device)
    models.warm_up()
    bound_host, bound_port = sock.getsockname()[:2]
    app = build_app(models, host=host if host in ("", "0.0.0.0", "::") else bound_host, port=bound_port)
    print(f"onestep serve: {url_of(sock)}  (Ctrl-C to quit)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return getattr(server, "started", True) is not False
