"""``python -m tests.cvat_server --port 8080 --export-size-mb 500``: the test CVAT server, alone."""

from __future__ import annotations

import argparse
import signal
import threading

from .server import DEFAULT_TOKEN, CvatTestServer


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted; prints the URL and token to use."""
    parser = argparse.ArgumentParser(prog="python -m tests.cvat_server", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the Personal Access Token to accept")
    parser.add_argument("--export-size-mb", type=float, default=None, help="size of every export, in MiB")
    parser.add_argument("--export-seconds", type=float, default=0.2, help="time an export takes")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    server = CvatTestServer(host=args.host, port=args.port, token=args.token,
                            export_seconds=args.export_seconds, verbose=args.verbose)
    if args.export_size_mb is not None:
        server.export_size = int(args.export_size_mb * 1024 * 1024)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(f"test CVAT server at {server.url} (token {args.token}, exports of {server.export_size} bytes)",
              flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
