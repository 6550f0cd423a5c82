"""``effvit serve``: a page in the browser to straighten photos and try a classifier.

    effvit serve                 # then open http://127.0.0.1:8765/
    effvit serve --port 0        # any free port (the address is printed)

Straighten: drop photos; each shows before and after, the estimated tilt, the confidence and what was
done, with a download of the fixed photo (the file `effvit straighten` writes) and a zip of all of them.
Predict: choose a checkpoint (under --runs, or any path) and drop images: the top classes as bars.
Uploads stay in a temporary folder, removed when the server stops (Ctrl+C).
"""

from __future__ import annotations

import argparse
import signal

from effvit.serve import open_server


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local web page to straighten photos and try a classifier",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other is warned about)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one)")
    p.add_argument("--model", default=None, help="rotation model for the Straighten tab (default: the bundled "
                                                 "photo model)")
    p.add_argument("--runs", default="runs", help="folder whose checkpoints the Predict tab offers (default runs)")
    p.add_argument("--max-size", type=float, default=64.0, metavar="MB",
                   help="largest upload accepted, in megabytes (default 64)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if not args.max_size > 0:
        raise ValueError(f"--max-size must be a positive number of megabytes, got {args.max_size:g}")
    with open_server(args.host, args.port, rotation_model=args.model, runs=args.runs,
                     max_bytes=int(args.max_size * 1e6), device=args.device) as server:
        print(f"effvit serve: open {server.url} in a browser (Ctrl+C stops it and removes the uploads)",
              flush=True)
        previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl+C does: uploads removed
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
    print("effvit serve: stopped; the uploaded files are removed")
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
