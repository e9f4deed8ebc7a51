"""uvicorn on a socket bound beforehand, so that a port in use is one line, not a traceback.

On SIGTERM (or ^C) uvicorn stops accepting connections, waits for the requests in flight
to be answered (each has its deadline), then runs the app's shutdown, which ends the
model worker. After SIGTERM `run` then returns (the process exits 0); after ^C it raises
KeyboardInterrupt (130).
"""

from __future__ import annotations

import signal
import socket

import uvicorn
from fastapi import FastAPI

from transformer.errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket listening on (host, port); `UserError` naming them if it cannot."""
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections, and without it
        # Nagle's algorithm and delayed ACKs hold each answer back about 40 ms
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise UserError(f"`host` {host}: not an address to listen on ({getattr(e, 'strerror', None) or e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise UserError(f"`host` {host} `port` {port}: cannot listen ({e.strerror or e})") from None
    return sock


def run(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on `sock` until SIGTERM or ^C, finishing the requests in flight (from the main thread)."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    # uvicorn handles SIGTERM while it serves, then raises it again to the handler it found, whose default ends the
    # process (status 143) after a clean drain; this one stops the server, even before uvicorn listens for signals
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: setattr(server, "should_exit", True))
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
