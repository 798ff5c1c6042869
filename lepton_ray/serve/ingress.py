"""One URL for every replica of an application on a host, with no hop in between.

Each replica runs its own HTTP server (uvicorn, on the replica's event loop) on the same
``host:port``, bound with ``SO_REUSEPORT``: the kernel spreads incoming connections across the
replicas' listening sockets. A request goes client -> replica, as to a plain single-process server,
instead of client -> Serve proxy -> replica (an actor call, ~10 ms per request on a 2-core machine).
A replica that dies closes its socket, and new connections go to the others; Serve restarts it and
the new one binds the same port.

Why not Serve's own options (measured and compared in the README's serving section): the Serve
proxy adds that hop; its throughput-optimized direct ingress gives each replica its own port (one
URL per replica) and must be switched on in the cluster's environment before ``ray start``; Ray's
HAProxy ingress binds its replicas, metrics and stats ports on every interface, not 127.0.0.1.

Limits: the URL reaches the replicas on the node it names (127.0.0.1: this node's; with host 0.0.0.0,
``http://NODE:PORT`` reaches NODE's replicas, none on another node); connections are balanced, not
requests (one keep-alive client stays with one replica); one application per port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, Awaitable, Callable

__all__ = ["listen"]

DISCARD_LIMIT = 64 << 20
"""Most bytes of a request body the handler did not read (a 413, a 401, a 404) that are read and dropped before
the answer is sent. Most clients (Python's urllib, requests) send the whole body before they read the answer; a server
that answers and closes with unread bytes in its socket makes the kernel reset the connection, and such a client
sees ``Connection reset by peer`` instead of the answer. Dropped chunk by chunk (uvicorn reads 64 KiB ahead), never
held. A body declared larger than this is not read: the answer says ``Connection: close``."""


class _Receive:
    """A request's ASGI ``receive`` that remembers whether the body was read to its end."""

    def __init__(self, receive: Any, headers: list[tuple[bytes, bytes]]):
        self.receive, self.started, self.done = receive, False, False
        self.headers = dict(headers)

    async def __call__(self) -> dict:
        self.started = True
        message = await self.receive()
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    async def discard(self, limit: int = DISCARD_LIMIT) -> bool:
        """Read and drop what is left of the body, at most ``limit`` bytes; False: the rest was left unread."""
        declared = self.headers.get(b"content-length", b"")
        if self.done or (not self.started and self.headers.get(b"expect", b"").lower() == b"100-continue"):
            return self.done  # a client that waits for "100 Continue" before sending has sent nothing: none is sent
        if declared.isdigit() and int(declared) > limit:
            return False
        read = 0
        while not self.done and read <= limit:
            read += len((await self()).get("body", b""))
        return self.done


def reuse_port_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


async def listen(handler: Callable[[Any], Awaitable[Any]], host: str, port: int, root_path: str = "") -> tuple[Any, asyncio.Task]:
    """Serve ``handler(request) -> response`` (Starlette objects) on ``host:port`` shared with the other replicas;
    returns ``(server, task)`` once it accepts connections. Call on the event loop that runs ``handler``."""
    import os

    import uvicorn
    from starlette.requests import ClientDisconnect, Request

    replica = str(os.getpid())

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = _Receive(receive, scope["headers"])
        try:
            response = await handler(Request({**scope, "root_path": root_path}, body))
        except ClientDisconnect:  # the client left before its body ended: no one to answer (not a server error)
            return
        response.headers["x-lepton-replica"] = replica  # which replica answered (logs, debugging)
        if not await body.discard():  # the client reads the answer, not a reset connection
            response.headers["connection"] = "close"
        await response(scope, body, send)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:  # the replica process's signals are Ray's: leave its handlers alone
            yield

    sock = reuse_port_socket(host, port)
    server = Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False, timeout_keep_alive=30))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError(f"the HTTP server on {host}:{port} stopped before it started")
        await asyncio.sleep(0.01)
    return server, task
