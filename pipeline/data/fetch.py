"""The crawler's HTTP fetch: one URL of an untrusted list -> its bytes, or why not.

img2dataset (1.47.0) fetches each URL with urllib's default opener and ``r.read()``: it follows
``file://``, ``data:`` and ``ftp://`` URLs, connects to any host (loopback, the private network,
the cloud metadata service at 169.254.169.254) and follows redirects to any of them; it reads a
body whole, however large, and its timeout bounds each socket operation, not the download, so a
server that sends a byte now and then holds a thread for ever. A URL list is data from elsewhere,
so here, per URL (:func:`fetch`):

- scheme: ``http`` and ``https`` only, on the list's URL and on every redirect (at most
  :data:`MAX_REDIRECTS`);
- host: the address the socket actually connected to (so a DNS name that resolves to an inside
  address, or a redirect to one, is caught too; checked before a byte is sent or TLS starts)
  must be a public one (:func:`address_refusal`). ``crawl.allow_private_hosts`` opts in loopback
  and private networks (a list served from one's own machine or LAN, as the tests do); link-local
  (cloud metadata), multicast, unspecified and reserved addresses are refused always. The
  embedded corpus's own loopback server is allowed by its exact origin (``allowed_origins``);
- no proxy from the environment (the address checked must be the server's);
- size: a ``Content-Length`` over ``crawl.max_bytes`` is refused before the body is read, and the
  body is read in pieces and dropped as soon as it passes ``crawl.max_bytes``;
- time: ``crawl.timeout_s`` per socket operation (connect, each read) and ``crawl.deadline_s`` for
  the whole URL, enforced by a watchdog thread that shuts the socket down (a drip-feeding server, slow
  headers, a slow TLS handshake);
- opt-out: ``X-Robots-Tag`` directives (``noai``, ...) without a user-agent token, or addressed to
  one of :data:`USER_AGENT_TOKENS`, drop the URL (img2dataset ignores targeted ones unless given
  its token). The user agent names the crawler honestly.

Failures come back as messages that :func:`pipeline.data.crawl.classify` maps to a reason:
"refused URL: ..." -> ``refused_url``, "response body too large" -> ``too_large``, "... timed
out ..." -> ``timeout``, "... X-Robots-Tag ..." -> ``opted_out``; HTTP errors keep urllib's
"HTTP Error 404: ..." form.

img2dataset runs its downloads in spawned worker processes, so the fetch reaches them inside the
pickled :class:`GuardedDownloader` (a module-level patch in this process would not).
"""
from __future__ import annotations

import functools
import heapq
import http.client
import io
import ipaddress
import itertools
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

SCHEMES = ("http", "https")
MAX_REDIRECTS = 5
CHUNK = 1 << 16                  # bytes per read of the body: read1() returns what has arrived, up to this
USER_AGENT_TOKENS = ("img2dataset", "unclip-pipeline")
USER_AGENT = "Mozilla/5.0 (compatible; unclip-pipeline; img2dataset; +https://github.com/rom1504/img2dataset)"
DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
REFUSED = "refused URL"          # the prefix of every refusal message (crawl reason refused_url)
TOO_LARGE = "response body too large"


class RefusedURL(OSError):
    """A URL, redirect target or connected address the crawl policy does not fetch. An OSError,
    so that urllib passes it on as the reason of a URLError, like any connection failure."""


class BodyTooLarge(OSError):
    pass


@dataclass(frozen=True)
class FetchPolicy:
    """What the crawl may fetch (pickled to img2dataset's workers)."""
    timeout_s: float                             # each socket operation
    deadline_s: float                            # the whole URL: connect, redirects, headers, body
    max_bytes: int                               # of a body
    allow_private_hosts: bool = False            # loopback and private networks (RFC 1918, ULA)
    allowed_origins: frozenset = field(default_factory=frozenset)   # {(host, port)}: the corpus's own server
    directives: tuple = DISALLOWED_DIRECTIVES


# Cloud instance metadata outside link-local (AWS's IPv6 endpoint); 169.254.169.254 is link-local.
METADATA = frozenset({ipaddress.ip_address("fd00:ec2::254")})


def address_refusal(ip: str, allow_private: bool) -> Optional[str]:
    """Why a connection to ``ip`` is refused, or None for a public address (or a private one
    with ``allow_private``). An IPv4-mapped IPv6 address is judged as the IPv4 address it is."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for kind in ("unspecified", "multicast", "link_local"):
        if getattr(addr, f"is_{kind}"):
            return f"{addr} is {'an' if kind == 'unspecified' else 'a'} {kind.replace('_', '-')} address"
    if addr in METADATA:
        return f"{addr} is a cloud metadata service"
    if addr.is_loopback or addr.is_private:           # (::1 is also "reserved": judged here first)
        return None if allow_private else (f"{addr} is a {'loopback' if addr.is_loopback else 'private'} "
                                           f"address (crawl.allow_private_hosts is false)")
    if addr.is_reserved:
        return f"{addr} is a reserved address"
    if not addr.is_global:
        return None if allow_private else f"{addr} is not a public address (crawl.allow_private_hosts is false)"
    return None


def url_refusal(url: str) -> Optional[str]:
    """Why ``url`` is refused before any connection (its scheme, no host), or None."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port                                           # noqa: B018 -- raises on a bad port
    except ValueError as err:
        return f"{REFUSED}: malformed URL ({err})"
    if parts.scheme.lower() not in SCHEMES:
        return f"{REFUSED}: scheme {parts.scheme.lower() or '(none)'!r} (only http and https are fetched)"
    if not parts.hostname:
        return f"{REFUSED}: no host"
    return None


class _Watch:
    """The sockets of one fetch, shut down when its deadline passes (so a blocked read returns)."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self.lock:
            if self.expired:
                sock.close()
                raise TimeoutError("deadline passed")
            self.sockets.append(sock)

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _guarded_connect(policy: FetchPolicy, watch: _Watch, host: str, port: int):
    """socket.create_connection's replacement for one HTTP(S) connection: resolve the host once,
    refuse it if any of its addresses is refused, and connect to those checked addresses (not to
    a second resolution, which could answer differently), before the request or TLS is sent."""
    allow_private = policy.allow_private_hosts or (host, port) in policy.allowed_origins

    def create_connection(address, timeout=None, source_address=None, **_):
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            why = address_refusal(sockaddr[0], allow_private)
            if why:
                raise RefusedURL(f"{REFUSED}: host {host!r}: {why}")
        error: Optional[OSError] = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                watch.add(sock)
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                sock.close()
                error = err
        raise error if error is not None else OSError(f"{host!r} resolved to no address")
    return create_connection


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, *, policy: FetchPolicy, watch: _Watch, **kw):
        super().__init__(host, **kw)
        self._create_connection = _guarded_connect(policy, watch, self.host, self.port)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, *, policy: FetchPolicy, watch: _Watch, **kw):
        super().__init__(host, **kw)
        self._create_connection = _guarded_connect(policy, watch, self.host, self.port)


class _Guarded:
    """urllib's HTTP(S) handler opening its connections through ours: under ``policy``, watched
    by ``watch``, the watch of the fetch in progress (set by :meth:`Opener.open`)."""
    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        self.watch: Optional[_Watch] = None

    def _open(self, connection, req):
        return self.do_open(connection, req, policy=self.policy, watch=self.watch)


class _HTTPHandler(_Guarded, urllib.request.HTTPHandler):
    def http_open(self, req):
        return self._open(_HTTPConnection, req)


class _HTTPSHandler(_Guarded, urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self._open(_HTTPSConnection, req)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects (at most MAX_REDIRECTS), each target's scheme judged first (urllib's own
    check lets ftp through); its host is judged when the next connection is made."""
    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            why = url_refusal(urllib.parse.urljoin(req.full_url, target))
            if why:
                fp.close()
                raise urllib.error.URLError(RefusedURL(f"{why} (a redirect from {req.full_url})"))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class Opener:
    """urllib with http(s) only, no proxies, checked connections and redirects, for one thread:
    each :meth:`open` hands its fetch's watch to the connection handlers. Built once per thread
    and policy (:func:`opener`): building one costs about 0.5 ms of CPU (``OpenerDirector.add_handler``
    inspects every method of every handler), as much as the rest of a loopback fetch."""

    def __init__(self, policy: FetchPolicy):
        self.guarded = (_HTTPHandler(policy), _HTTPSHandler(policy))
        self.director = urllib.request.OpenerDirector()
        for handler in (*self.guarded, _RedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                        urllib.request.HTTPErrorProcessor()):
            self.director.add_handler(handler)

    def open(self, request: urllib.request.Request, watch: _Watch, timeout: float):
        for handler in self.guarded:
            handler.watch = watch
        return self.director.open(request, timeout=timeout)


_openers = threading.local()


def opener(policy: FetchPolicy) -> Opener:
    """This thread's :class:`Opener` for ``policy`` (a thread runs one fetch at a time)."""
    by_policy = _openers.__dict__.setdefault("by_policy", {})
    if policy not in by_policy:
        by_policy[policy] = Opener(policy)
    return by_policy[policy]


class _Deadlines:
    """One thread per process that expires each fetch's watch when its deadline passes. A
    ``threading.Timer`` per URL started a thread per URL (about 0.2 ms of CPU each). Deadlines
    are kept in a heap; a cancelled one is dropped when it reaches the top."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Empty, no thread yet. Also in a forked child (Spark's Python workers fork), which
        inherits the heap and the lock, perhaps held, but not the thread."""
        self.heap: list[list] = []               # [when (monotonic s), sequence, watch or None]
        self.sequence = itertools.count()
        self.wake = threading.Condition()
        self.serving = False

    def add(self, seconds: float, watch: _Watch) -> list:
        """Expire ``watch`` in ``seconds``; returns the entry to :meth:`cancel`."""
        entry = [time.monotonic() + seconds, next(self.sequence), watch]
        with self.wake:
            if not self.serving:
                threading.Thread(target=self._serve, name="fetch-deadlines", daemon=True).start()
                self.serving = True
            heapq.heappush(self.heap, entry)
            if self.heap[0] is entry:            # the earliest now: the thread's wait must shorten
                self.wake.notify()
        return entry

    @staticmethod
    def cancel(entry: list) -> None:
        entry[2] = None

    def _serve(self) -> None:
        with self.wake:
            while True:
                now = time.monotonic()
                while self.heap and (self.heap[0][2] is None or self.heap[0][0] <= now):
                    watch = heapq.heappop(self.heap)[2]
                    if watch is not None:
                        watch.expire()
                self.wake.wait(self.heap[0][0] - now if self.heap else None)


_deadlines = _Deadlines()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_deadlines.reset)


def disallowed(headers, directives) -> bool:
    """Whether an ``X-Robots-Tag`` header forbids the use: one of ``directives`` said to every
    crawler (``noai, noimageai``) or to one of :data:`USER_AGENT_TOKENS` (``img2dataset: noai``);
    one addressed to another crawler (``googlebot: noai``) is not ours to follow."""
    for value in headers.get_all("X-Robots-Tag") or []:
        token, sep, rest = value.partition(":")
        token = token.strip().lower()
        if sep and _is_user_agent(token):
            if token not in USER_AGENT_TOKENS:
                continue
            said = rest
        else:
            said = value
        if any(d.strip().lower() in directives for d in said.split(",")):
            return True
    return False


# Directives that carry a value after a colon: the text before their colon names no user agent.
VALUED_DIRECTIVES = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")


def _is_user_agent(token: str) -> bool:
    return bool(token) and not any(c in token for c in ", \t") and token not in VALUED_DIRECTIVES


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body of ``url`` under ``policy``; raises urllib's errors (HTTPError, URLError),
    RefusedURL, BodyTooLarge or TimeoutError."""
    why = url_refusal(url)
    if why:
        raise RefusedURL(why)
    watch = _Watch()
    deadline = _deadlines.add(policy.deadline_s, watch)
    start = time.monotonic()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with opener(policy).open(request, watch, timeout=policy.timeout_s) as r:
            if disallowed(r.headers, policy.directives):
                raise PermissionError("Use of image disallowed by X-Robots-Tag directive")
            length = r.headers.get("Content-Length")
            if length and length.strip().isdigit() and int(length) > policy.max_bytes:
                raise BodyTooLarge(f"{TOO_LARGE}: Content-Length {int(length)} > crawl.max_bytes {policy.max_bytes}")
            body = io.BytesIO()
            while chunk := r.read1(CHUNK):
                body.write(chunk)
                if body.tell() > policy.max_bytes:
                    raise BodyTooLarge(f"{TOO_LARGE}: over crawl.max_bytes {policy.max_bytes}")
                if watch.expired:
                    break
        if watch.expired:
            raise TimeoutError("deadline passed")
        return body.getvalue()
    except (PermissionError, BodyTooLarge, RefusedURL):
        raise
    except Exception as err:
        if watch.expired or time.monotonic() - start >= policy.deadline_s:
            raise TimeoutError(f"download timed out: crawl.deadline_s ({policy.deadline_s} s per URL) passed "
                               f"({type(err).__name__})") from None
        if isinstance(err, urllib.error.URLError) and isinstance(err.reason, (RefusedURL, BodyTooLarge)):
            raise err.reason from None
        raise
    finally:
        _deadlines.cancel(deadline)


def message(err: BaseException) -> str:
    """The error text img2dataset records for a failed URL."""
    return str(err) or type(err).__name__


def download_with_retry(policy: FetchPolicy, row, timeout=None, retries=0, user_agent_token=None,
                        disallowed_header_directives=None):
    """img2dataset's ``download_image_with_retry`` (same arguments, same result: (key, BytesIO or
    None, error message or None)) through :func:`fetch`. A refusal, an opt-out or a body over the
    cap is not retried: the same URL would get the same answer."""
    key, url = row
    err_text = None
    for _ in range(retries + 1):
        try:
            return key, io.BytesIO(fetch(url, policy)), None
        except (RefusedURL, BodyTooLarge, PermissionError) as err:
            return key, None, message(err)
        except Exception as err:  # noqa: BLE001 -- every failure is a message in the crawl log
            err_text = message(err)
    return key, None, err_text


class GuardedDownloader:
    """img2dataset's Downloader with :func:`download_with_retry` in place of its own fetch, in
    the worker process that runs the shard (img2dataset's download_shard looks the function up
    in its module at each call; a worker runs one shard at a time)."""

    def __init__(self, policy: FetchPolicy, downloader):
        self.policy, self.downloader = policy, downloader

    def __call__(self, row):
        from img2dataset import downloader as module
        original = module.download_image_with_retry
        module.download_image_with_retry = functools.partial(download_with_retry, self.policy)
        try:
            return self.downloader(row)
        finally:
            module.download_image_with_retry = original


def guarded_downloader(policy: FetchPolicy, downloader_class, **kwargs) -> GuardedDownloader:
    """What img2dataset's ``download`` builds in place of ``Downloader(**kwargs)`` (see crawl.download)."""
    return GuardedDownloader(policy, downloader_class(**kwargs))
