"""``onestep serve``: the local web page of :mod:`onestep.serve`."""
from __future__ import annotations

import sys

from onestep.argtypes import port
from onestep.cli.flags import add_device

# the library (and torch with it) is imported inside each command function, when the command runs: building the
# parser imports none, so that ``onestep --help`` answers at once


def cmd_serve(args) -> None:
    from onestep.serve import serve

    try:
        started = serve(args.run, args.host, args.port, args.device)
    except KeyboardInterrupt:  # Ctrl-C: the way to stop the server (it has nothing to resume)
        started = True
    if not started:
        sys.exit(1)
    # also when the server shut down on a signal without raising it again (uvicorn restores the handler it found,
    # which ignores SIGINT in a process started in the background)
    print("onestep serve: stopped", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("serve", help="a local web page: the teacher and the one-step generators side by side, live",
                       description="Serve a page on which the AR teacher (streamed step by step) and the DD1 / DD2 "
                                   "one-step generators draw side by side, with latencies measured per request, the "
                                   "bench's FIDs, latent walks and a throughput panel. Without --run: the shipped "
                                   "teacher, DD1 and DD2 runs of assets/fashion-mnist.")
    p.add_argument("--run", action="append", default=None, metavar="DIR",
                   help="a teacher, DD1 or DD2 run to serve (repeatable; a kind not given: the shipped run)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port (default: 8000; 0 = any free port)")
    add_device(p)
    p.set_defaults(func=cmd_serve)
