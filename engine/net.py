"""The one way the engine reaches a URL a caller named (image inputs, LoRA files, webhooks): an SSRF guard.

- Only http and https. Connections are direct: no proxy from the environment is used.
- The host is resolved once per hop; every address it resolves to must be public unicast (not private, loopback,
  link-local, shared, multicast, reserved or unspecified; IPv4-mapped IPv6 judged by its IPv4 part) unless
  `allow_private`. The connection then goes to that checked address (pinned): a rebinding DNS server gets no second
  lookup to answer differently. The Host header, TLS SNI and certificate check still use the name.
- Redirects (GET only) are followed by hand, at most MAX_REDIRECTS, each new location checked like the first URL.
  POSTs (webhooks) never follow redirects.
- Bodies are capped (Content-Length when declared, and the bytes as they stream) and the whole exchange has one
  deadline. `download` streams to a temporary file beside its destination while hashing (sha256), so a large file
  is never held in memory.

Every refusal is an `InvalidRequestError` on the caller's field (422).

`local_urls(resolver)` lets a server answer its own URLs (files it handed out) from disk: inside it, `fetch` asks the
resolver first and makes no connection when it answers.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .errors import InvalidRequestError

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
USER_AGENT = "engine-fetch/1"
REDIRECTS = (301, 302, 303, 307, 308)

Resolver = Callable[[str, int], Sequence[str]]
Connector = Callable[[str, int, float], socket.socket]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (one getaddrinfo call)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def tcp_connect(address: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((address, port), timeout)


def is_public_address(address: str) -> bool:
    """True when `address` is a public unicast address (IPv4-mapped IPv6 judged by its IPv4 part)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _public(address: str) -> bool:
    try:
        return is_public_address(address)
    except ValueError:  # not an IP address at all: never connect to it
        return False


@dataclass(frozen=True)
class Guard:
    """How URLs are reached: `allow_private` lifts the address check (a trusted operator's choice); `resolver` and
    `connector` are the seams tests replace (the resolver is called exactly once per hop)."""

    allow_private: bool = False
    resolver: Resolver = system_resolver
    connector: Connector = tcp_connect
    max_redirects: int = MAX_REDIRECTS


def _guard(guard: Guard | None, allow_private: bool) -> Guard:
    """An explicit `guard` wins (its own allow_private); otherwise the system resolver with `allow_private`."""
    return guard if guard is not None else Guard(allow_private=allow_private)


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line


def parse_url(url: str, field: str) -> Target:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidRequestError(field, f"URL scheme {scheme!r} is not accepted", "http, https")
    try:
        host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise InvalidRequestError(field, f"malformed URL ({e})") from None
    if not host:
        raise InvalidRequestError(field, "URL has no host")
    path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    return Target(scheme, host, port, path)


def resolve_pinned(host: str, port: int, guard: Guard, field: str) -> str:
    """One address to connect to; every address the name resolves to must be public unless private is allowed."""
    try:
        addresses = list(guard.resolver(host, port))
    except (OSError, UnicodeError) as e:
        raise InvalidRequestError(field, f"cannot resolve host {host!r} ({e})") from None
    if not addresses:
        raise InvalidRequestError(field, f"host {host!r} has no address")
    if not guard.allow_private:
        blocked = [a for a in addresses if not _public(a)]
        if blocked:
            raise InvalidRequestError(
                field, f"host {host!r} resolves to a private, loopback, link-local or reserved address ({blocked[0]})",
                "public http(s) URLs",
            )
    return addresses[0]


def check_url(url: str, *, field: str, allow_private: bool = False, guard: Guard | None = None) -> None:
    """Refuse now what a later fetch of `url` would refuse for its scheme or address (e.g. a webhook at submit)."""
    target = parse_url(url, field)
    resolve_pinned(target.host, target.port, _guard(guard, allow_private), field)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an already-checked address; the Host header still carries the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, connector: Connector) -> None:
        super().__init__(host, port, timeout=timeout)
        self.pinned_address = address
        self.connector = connector

    def connect(self) -> None:
        self.sock = self.connector(self.pinned_address, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an already-checked address; SNI and the certificate check use the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, connector: Connector) -> None:
        self.tls_context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls_context)
        self.pinned_address = address
        self.connector = connector

    def connect(self) -> None:
        sock = self.connector(self.pinned_address, self.port, self.timeout)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


def _remaining(deadline: float, field: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise InvalidRequestError(field, "fetching the URL timed out")
    return left


def _connection(url: str, guard: Guard, field: str, deadline: float) -> tuple[http.client.HTTPConnection, str]:
    target = parse_url(url, field)
    address = resolve_pinned(target.host, target.port, guard, field)
    cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    return cls(target.host, target.port, address, _remaining(deadline, field), guard.connector), target.path


def check_size(n: int, max_bytes: int, field: str) -> None:
    if n > max_bytes:
        raise InvalidRequestError(field, f"the data is {n} bytes, over the limit", f"at most {max_bytes} bytes")


def _stream(url: str, sink: Callable[[bytes], None], *, field: str, max_bytes: int, guard: Guard, timeout_s: float,
            accept: str) -> str:
    """GET `url`, following checked redirects, feeding the body to `sink` chunk by chunk; returns the final URL."""
    deadline = time.monotonic() + timeout_s
    for _ in range(guard.max_redirects + 1):
        conn, path = _connection(url, guard, field, deadline)
        try:
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": accept,
                                               "Accept-Encoding": "identity"})
            response = conn.getresponse()
            if response.status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise InvalidRequestError(field, f"redirect ({response.status}) without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise InvalidRequestError(field, f"fetching the URL failed: HTTP {response.status} {response.reason}")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit():
                check_size(int(declared), max_bytes, field)
            total = 0
            while True:
                if conn.sock is not None:
                    conn.sock.settimeout(_remaining(deadline, field))
                chunk = response.read(CHUNK)
                if not chunk:
                    return url
                total += len(chunk)
                check_size(total, max_bytes, field)
                sink(chunk)
        except (OSError, http.client.HTTPException) as e:
            raise InvalidRequestError(field, f"fetching the URL failed ({type(e).__name__}: {e})") from None
        finally:
            conn.close()
    raise InvalidRequestError(field, f"more than {guard.max_redirects} redirects")


LocalResolver = Callable[[str], "bytes | None"]
_LOCAL_URLS: contextvars.ContextVar[LocalResolver | None] = contextvars.ContextVar("engine_local_urls", default=None)


@contextlib.contextmanager
def local_urls(resolver: LocalResolver) -> Iterator[None]:
    """Within this block `fetch` first asks `resolver(url)`; bytes it returns are the body (no connection made)."""
    token = _LOCAL_URLS.set(resolver)
    try:
        yield
    finally:
        _LOCAL_URLS.reset(token)


def fetch(url: str, *, field: str, max_bytes: int, allow_private: bool = False, timeout_s: float = 20,
          accept: str = "*/*", guard: Guard | None = None) -> bytes:
    """The body of `url` in memory (for small inputs such as images; large files go through `download`)."""
    resolver = _LOCAL_URLS.get()
    local = resolver(url) if resolver is not None else None
    if local is not None:
        check_size(len(local), max_bytes, field)
        return local
    chunks: list[bytes] = []
    _stream(url, chunks.append, field=field, max_bytes=max_bytes, guard=_guard(guard, allow_private),
            timeout_s=timeout_s, accept=accept)
    return b"".join(chunks)


@dataclass(frozen=True)
class Download:
    path: Path
    sha256: str
    size: int
    url: str  # after redirects


def download(url: str, directory: Path, *, field: str, max_bytes: int, allow_private: bool = False,
             timeout_s: float = 300, suffix: str = "", accept: str = "*/*", guard: Guard | None = None) -> Download:
    """Stream `url` into a new temporary file in `directory`, hashing as it goes; the caller renames or removes it.
    Nothing is left behind on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            def sink(chunk: bytes) -> None:
                nonlocal size
                digest.update(chunk)
                f.write(chunk)
                size += len(chunk)

            final = _stream(url, sink, field=field, max_bytes=max_bytes, guard=_guard(guard, allow_private),
                            timeout_s=timeout_s, accept=accept)
    except BaseException:
        os.unlink(tmp)
        raise
    return Download(Path(tmp), digest.hexdigest(), size, final)


def post_json(url: str, body: bytes, *, field: str, allow_private: bool = False, timeout_s: float = 15,
              guard: Guard | None = None, headers: dict[str, str] | None = None) -> int:
    """POST a JSON body once to the checked, pinned address (with extra `headers`); redirects are not followed.
    Returns the status."""
    g = _guard(guard, allow_private)
    deadline = time.monotonic() + timeout_s
    conn, path = _connection(url, g, field, deadline)
    try:
        conn.request("POST", path, body=body, headers={**(headers or {}), "User-Agent": USER_AGENT,
                                                       "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read(CHUNK)  # a polite drain of the start of the answer; the rest is dropped
        return response.status
    finally:
        conn.close()
