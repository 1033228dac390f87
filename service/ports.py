"""Binding the server's ports before anything says where it listens, and refusing a taken one in one line.

Two servers on one machine must not share a port: with SO_REUSEPORT (gRPC's default) the kernel would split
calls between them at random. So the HTTP socket is bound here (SO_REUSEADDR only, as uvicorn does) and
handed to uvicorn, and the gRPC port is checked the same way before gRPC binds it without SO_REUSEPORT.
"""

from __future__ import annotations

import errno
import socket


class PortTaken(OSError):
    """A port another process holds (or one that cannot be bound); str() is the one line the CLI prints."""

    def __init__(self, message: str, code: int = errno.EADDRINUSE) -> None:
        super().__init__(message)
        self.errno = code


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _refusal(what: str, host: str, port: int, flag: str, exc: OSError) -> PortTaken:
    if exc.errno == errno.EADDRINUSE:
        return PortTaken(f"{what} port {port} on {host} is in use (another dense-serve?); choose another with {flag}")
    return PortTaken(f"cannot bind the {what} port {host}:{port}: {exc.strerror or exc}", exc.errno or 0)


def listen_http(host: str, port: int, flag: str = "--port") -> socket.socket:
    """A listening socket on host:port for uvicorn (`Server.serve(sockets=[...])`); PortTaken if it is held."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # listening at once: a second server's bind now fails even with SO_REUSEADDR
    except OSError as exc:
        sock.close()
        raise _refusal("HTTP", host, port, flag, exc) from exc
    sock.set_inheritable(True)
    return sock


def check_free(what: str, host: str, port: int, flag: str) -> None:
    """PortTaken if host:port is held by a listening socket (every address `host` resolves to); port 0 is free."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortTaken(f"cannot resolve the {what} host {host!r}: {exc}", errno.EINVAL) from exc
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise _refusal(what, host, port, flag, exc) from exc
