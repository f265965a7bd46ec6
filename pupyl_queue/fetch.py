"""Fetching remote references safely: bounded, retried, and never into private networks.

Every hop of a redirect chain is checked: a literal IP host directly, a name
through the resolver the connection itself uses (so a name cannot resolve to a
public address for the check and a private one for the connection). Private,
loopback, link-local, multicast and reserved addresses are refused unless
listed in PUPYL_FETCH_ALLOW_NETWORKS.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pupyl_queue.settings import Settings

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class FetchError(Exception):
    """A reference could not be fetched; the message is the per-item reason."""


class FetchRetryable(FetchError):
    """A server answer worth trying again (429, 5xx, ...)."""


class FetchRefused(FetchError):
    """The address is not allowed (SSRF guard) or the scheme is not http(s)."""


@dataclass
class Fetched:
    url: str
    data: bytes = b""
    error: str = ""
    attempts: int = 0
    content_type: str = ""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Sink = Callable[[], IO[bytes]]


def parse_url(text: str, what: str = "URL") -> URL:
    """A URL checked up front (host, port): a malformed one is one failed item, never retried."""
    try:
        url = URL(text)
        _ = url.port  # yarl checks the port range only when it is read
    except (ValueError, TypeError) as exc:
        raise FetchError(f"malformed {what}: {exc}") from None
    if url.is_absolute() and not url.raw_host:
        raise FetchError(f"malformed {what}: no host")
    return url


def parse_networks(text: str) -> list[Network]:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


def address_allowed(address: str, allowed: Sequence[Network]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in allowed):
        return True
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then drops every address the guard refuses."""

    def __init__(self, allowed: Sequence[Network]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if address_allowed(r["host"], self._allowed)]
        if not kept:  # the addresses stay out of the message: they map the private network
            raise FetchRefused(
                f"refused: {host} resolves to a private or local address; "
                "PUPYL_FETCH_ALLOW_NETWORKS can allow it"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()


class Fetcher:
    """Fetch many URLs concurrently within the limits of the settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.allowed = parse_networks(settings.fetch_allow_networks)

    def check_url(self, url: URL) -> None:
        if url.scheme not in ("http", "https"):
            raise FetchRefused(f"refused: only http and https URLs are fetched, not {url.scheme or 'none'}")
        host = url.raw_host or ""
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return  # a name: checked by the resolver at connection time
        if not address_allowed(host.strip("[]"), self.allowed):
            raise FetchRefused(f"refused: {host} is a private or local address")

    def fetch_many(self, urls: Sequence[str], max_bytes: int) -> list[Fetched]:
        """Fetch all, in order; each result holds the bytes or the reason there are none."""
        if not urls:
            return []
        return asyncio.run(self._fetch_all(urls, max_bytes, io.BytesIO))

    def fetch(self, url: str, max_bytes: int) -> bytes:
        result = self.fetch_many([url], max_bytes)[0]
        if result.error:  # the guard's reasons all start with "refused:"
            raise (FetchRefused if result.error.startswith("refused") else FetchError)(result.error)
        return result.data

    def download(self, url: str, max_bytes: int) -> IO[bytes]:
        """A large remote file (an archive, a list) as a seekable temp file, spilling to disk past 32 MB."""
        holder: list[IO[bytes]] = []

        def sink() -> IO[bytes]:
            for old in holder:
                old.close()
            holder[:] = [tempfile.SpooledTemporaryFile(max_size=32 << 20)]  # noqa: SIM115
            return holder[0]

        result = asyncio.run(self._fetch_all([url], max_bytes, sink))[0]
        if result.error:
            raise FetchError(result.error)
        fh = holder[0]
        fh.seek(0)
        return fh

    async def _fetch_all(self, urls: Sequence[str], max_bytes: int, sink: Sink) -> list[Fetched]:
        s = self.settings
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=s.fetch_connect_timeout, sock_read=s.fetch_read_timeout
        )
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.allowed), limit=s.fetch_concurrency, limit_per_host=8
        )
        limit = asyncio.Semaphore(s.fetch_concurrency)
        headers = {"User-Agent": "pupyl-queue/0.1 (+image indexer)"}
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=headers, trust_env=False
        ) as session:

            async def one(url: str) -> Fetched:
                async with limit:
                    return await self._fetch_with_retries(session, url, max_bytes, sink)

            return list(await asyncio.gather(*(one(u) for u in urls)))

    async def _fetch_with_retries(
        self, session: aiohttp.ClientSession, url: str, max_bytes: int, sink: Sink
    ) -> Fetched:
        result = Fetched(url)
        attempts = self.settings.fetch_retries + 1
        for attempt in range(1, attempts + 1):
            result.attempts = attempt
            try:
                out = sink()
                result.content_type = await self._fetch_once(session, parse_url(url), max_bytes, out)
                if isinstance(out, io.BytesIO):
                    result.data = out.getvalue()
                result.error = ""
                return result
            except FetchError as exc:
                result.error = str(exc)
                if not isinstance(exc, FetchRetryable) or attempt == attempts:
                    return result
            except aiohttp.InvalidURL as exc:  # aiohttp's own checks of a URL: never retried
                result.error = f"malformed URL: {exc}"
                return result
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                result.error = _describe(exc)
                if attempt == attempts:
                    result.error += f" (after {attempts} attempts)"
                    return result
            await asyncio.sleep(min(0.25 * 2 ** (attempt - 1), 8.0))
        return result

    async def _fetch_once(
        self, session: aiohttp.ClientSession, url: URL, max_bytes: int, out: IO[bytes]
    ) -> str:
        for _hop in range(self.settings.fetch_max_redirects + 1):
            self.check_url(url)
            async with session.get(url, allow_redirects=False) as response:
                if response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(f"HTTP {response.status} without a Location header")
                    url = url.join(parse_url(location, "redirect Location"))
                    continue
                if response.status != 200:
                    kind = FetchRetryable if response.status in RETRY_STATUS else FetchError
                    raise kind(f"HTTP {response.status} from {url.host}")
                declared = response.content_length
                if declared is not None and declared > max_bytes:
                    raise FetchError(f"too large: {declared} bytes > {max_bytes}")
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FetchError(f"too large: more than {max_bytes} bytes")
                    out.write(chunk)
                return response.headers.get("Content-Type", "")
        raise FetchError(f"too many redirects (more than {self.settings.fetch_max_redirects})")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FetchRefused):
        return str(exc)
    cause: Any = exc
    while cause is not None:
        if isinstance(cause, FetchRefused):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out (PUPYL_FETCH_CONNECT_TIMEOUT / PUPYL_FETCH_READ_TIMEOUT)"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"
