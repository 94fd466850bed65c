"""URLs the service connects to on a client's behalf (webhook receivers, `spec.images_url` archives): which may be
used, and which addresses a connection may go to.

One parser, httpx's (the one that sends), reads such a URL when it is submitted and again before every use, so
what is checked is what is connected to. A use resolves the host once, checks every address it got, and connects
to exactly those (`Target.addresses`), keeping the URL's name for the Host header and the TLS server name: a name
that answers a public address to the check and a private one to the connection (DNS rebinding) cannot steer a
connection to an address nobody checked. Error messages name what the URL is for (`Purpose`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the host's addresses, in the order to try them (`system_resolver`; tests give their own).
Resolver = Callable[[str, int], Sequence[str]]
# Whether a connection may go to an address (`public_only`, or `any_address` where private ones are allowed).
AddressPolicy = Callable[[IPAddress], bool]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: local-use NAT64, any embedding
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix: the IPv4 address is the last 32 bits
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible ::a.b.c.d
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT IPv4-translated ::ffff:0:a.b.c.d


@dataclass(frozen=True)
class Purpose:
    """What a URL is for, as its error messages name it: "the webhook URL" and "the webhook host"."""

    url: str
    host: str


WEBHOOK = Purpose(url="the webhook URL", host="the webhook host")
IMAGES = Purpose(url="the images URL", host="the images URL's host")


class TargetError(Exception):
    """The URL may not be used (malformed, not http(s), unresolvable, or on a refused address)."""


class UrlInvalid(TargetError):
    """The URL cannot be parsed as an http(s) URL with a valid host and port."""


class HostUnresolved(TargetError):
    """The URL's host name does not resolve (now: a later use may succeed)."""


@dataclass(frozen=True)
class Target:
    """A checked URL: the URL as httpx reads it, its host as the Host header and TLS server name carry it (IDNA),
    its port, and the addresses that were checked, which are the only ones to connect to."""

    url: httpx.URL
    host: str
    port: int
    addresses: tuple[IPAddress, ...]

    @property
    def host_is_address(self) -> bool:
        """Whether the URL names an address literal (no name to resolve, no TLS server name to send)."""
        return _as_address(self.host) is not None

    def pinned_url(self, address: IPAddress) -> httpx.URL:
        """The URL with its host replaced by one checked address: what a connection is opened to (send the Host
        header and TLS server name of `host` with it)."""
        return self.url.copy_with(host=str(address))

    @property
    def host_header(self) -> str:
        """The Host header of a request to this target: the URL's host and port, as written."""
        return self.url.netloc.decode("ascii")


def parse_url(url: str, purpose: Purpose) -> httpx.URL:
    """The URL as the sender reads it; `UrlInvalid` unless it is http(s) with a valid host and port (httpx alone
    accepts ports above 65535 and hosts with spaces)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise UrlInvalid(f"{purpose.url} is not a valid URL ({exc})") from exc
    if parsed.scheme not in ("http", "https"):
        raise UrlInvalid(f"{purpose.url} must be an http:// or https:// URL")
    host = parsed.raw_host.decode("ascii", errors="replace").lower()
    if not host:
        raise UrlInvalid(f"{purpose.url} must name a host")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise UrlInvalid(f"{purpose.url}'s port {parsed.port} is not between 1 and 65535")
    if _as_address(host) is None and not _is_hostname(host):
        raise UrlInvalid(f"{purpose.url}'s host is neither a host name nor an IP address")
    return parsed


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and reaches, if any: IPv4-mapped `::ffff:a.b.c.d`,
    IPv4-compatible `::a.b.c.d`, IPv4-translated, NAT64 `64:ff9b::/96`, 6to4 `2002::/16` and Teredo."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or address in _COMPATIBLE or address in _TRANSLATED:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def public_only(address: IPAddress) -> bool:
    """The default address policy: only globally routable unicast addresses, and no IPv6 address that embeds
    (and so reaches) a loopback, private or otherwise non-public IPv4 address. The service must not probe its
    own network."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return False
        embedded = embedded_ipv4(address)
        if embedded is not None and not public_only(embedded):
            return False
    return address.is_global and not address.is_multicast


def any_address(address: IPAddress) -> bool:  # noqa: ARG001 (a policy takes the address)
    """The address policy where the operator allows private targets (`DOPSD_WEBHOOK_ALLOW_PRIVATE`,
    `DOPSD_IMAGES_URL_ALLOW_PRIVATE`)."""
    return True


def policy_for(allow_private: bool) -> AddressPolicy:
    """The address policy of a setting: `any_address` when private targets are allowed, else `public_only`."""
    return any_address if allow_private else public_only


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the system resolver (TCP), in its order, without repeats."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_target(url: str, policy: AddressPolicy, resolver: Resolver, purpose: Purpose) -> Target:
    """Parses `url`, resolves its host once and checks every address with `policy`. Returns the target with the
    checked addresses; raises `UrlInvalid`, `HostUnresolved`, or `TargetError` when any address is refused."""
    parsed = parse_url(url, purpose)
    host = parsed.raw_host.decode("ascii").lower()
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    literal = _as_address(host)
    if literal is not None:
        addresses: tuple[IPAddress, ...] = (literal,)
    else:
        try:
            answers = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise HostUnresolved(f"{purpose.host} {host!r} does not resolve") from exc
        resolved = [_as_address(a) for a in answers]
        addresses = tuple(a for a in resolved if a is not None)
        if not addresses or len(addresses) != len(resolved):
            raise HostUnresolved(f"{purpose.host} {host!r} does not resolve to an IP address")
    for address in addresses:
        if not policy(address):
            raise TargetError(f"{purpose.host} {host!r} is on a private or loopback address ({address})")
    return Target(url=parsed, host=host, port=port, addresses=addresses)


def redacted(url: str) -> str:
    """The URL for logs and error messages: scheme, host, port and path, without credentials, query string or
    fragment (they may carry a token or a presigned URL's signature)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        host = parts.hostname or ""
    except ValueError:
        return "<malformed URL>"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _as_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_hostname(host: str) -> bool:
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))
