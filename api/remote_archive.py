"""`spec.images_url`: a dataset archive (`.zip`, `.tar`, `.tar.gz`) that the API fetches itself during the
submission, instead of receiving it as the `images` part. The fetched file then goes down the uploaded archive's
path (`api/submission.py`: expansion in a validation process, every image check, the captions), so a URL refuses
all that an upload refuses, and nothing is stored before every check passed.

A URL a client names is a way into the service's own network and a way to hold its resources, so the fetch is
bounded as the webhook sender is (`core/outbound.py`, `core/webhooks/posting.py`):
- https:// only, on public addresses; plain http:// and private or loopback addresses only with
  `DOPSD_IMAGES_URL_ALLOW_PRIVATE` (tests, on-premises object stores).
- The host is resolved once, every address checked, and only checked addresses are connected to; the URL's name
  stays in the Host header and the TLS server name, so the certificate is verified against it.
- Redirects are followed by hand, at most `DOPSD_IMAGES_URL_MAX_REDIRECTS`, each target checked again as the URL
  was (a redirect to a private address, or from https:// to http://, is refused before anything is sent to it).
- One deadline (`DOPSD_IMAGES_URL_TIMEOUT_S`) covers the whole fetch: resolutions, connections, redirects, the
  body; a server that trickles a byte a second is cut at it, not per read.
- The bytes are counted as they arrive against `DOPSD_IMAGES_URL_MAX_BYTES` (a Content-Length over it is refused
  before the body); the answer is asked for and kept as sent (`Accept-Encoding: identity`, never decompressed), and
  the environment's proxies are not used.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import certifi
import httpx
from anyio import to_thread

from api.archives import archive_kind
from api.uploads import UploadedFile, safe_display_name
from core.config import Settings
from core.errors import InvalidRequest, InvalidSpec, PayloadTooLarge
from core.outbound import (
    IMAGES,
    AddressPolicy,
    HostUnresolved,
    Resolver,
    Target,
    TargetError,
    UrlInvalid,
    check_target,
    parse_url,
    policy_for,
    redacted,
    system_resolver,
)


USER_AGENT = "dopsd-images-url/1"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
FILE_NAME = "images-url"  # where the fetched archive is written in the request's temporary folder


@dataclass(frozen=True)
class FetchRules:
    """How one `spec.images_url` fetch is bounded, and where it may connect."""

    max_bytes: int
    timeout_s: float
    max_redirects: int
    allow_http: bool
    policy: AddressPolicy
    resolver: Resolver
    ssl_context: ssl.SSLContext


def fetch_rules(settings: Settings, state: Any = None) -> FetchRules:
    """The rules `settings` give. An app's `state.images_url_resolver` and `state.images_url_policy`, when set,
    replace the system resolver and the setting's address policy: the tests' way of giving names of their own to
    servers on loopback (as they hand the webhook sender a resolver)."""
    return FetchRules(
        max_bytes=settings.images_url_max_bytes or settings.max_total_bytes,
        timeout_s=settings.images_url_timeout_s,
        max_redirects=settings.images_url_max_redirects,
        allow_http=settings.images_url_allow_private,
        policy=getattr(state, "images_url_policy", None) or policy_for(settings.images_url_allow_private),
        resolver=getattr(state, "images_url_resolver", None) or system_resolver,
        ssl_context=ssl_context(str(settings.images_url_ca_bundle) if settings.images_url_ca_bundle else None),
    )


@functools.cache
def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The TLS settings of fetches: certificates verified against `ca_bundle` (PEM), else certifi's (made once
    per bundle)."""
    return ssl.create_default_context(cafile=ca_bundle or certifi.where())


async def fetch_archive(url: str, folder: Path, rules: FetchRules) -> UploadedFile:
    """Fetches the archive `url` names into `folder` within `rules`, as the one file of the upload (named after
    the URL's last path segment). Raises with a stable code: `images_url_invalid` (not an http(s) URL),
    `images_url_refused` (http:// where only https:// is allowed, a private address, too many redirects),
    `images_url_unreachable` (no answer, a TLS failure, or not 2xx), `images_url_timeout` (past the time cap),
    413 `images_url_too_large`, or `archive_invalid` (what came is not a zip or tar archive)."""
    try:
        with anyio.fail_after(rules.timeout_s):
            return await _fetch(url, folder / FILE_NAME, rules)
    except (TimeoutError, httpx.TimeoutException):
        raise InvalidSpec(
            f"the images URL was not fetched within {rules.timeout_s:g} s", code="images_url_timeout",
            details={"url": redacted(url), "timeout_s": rules.timeout_s},
        ) from None  # fmt: skip
    except httpx.TransportError as exc:
        raise _unreachable(url, f"the images URL's server failed ({type(exc).__name__}: {exc})") from None


async def _fetch(url: str, path: Path, rules: FetchRules) -> UploadedFile:
    current = url
    async with _client(rules) as client:
        for _ in range(rules.max_redirects + 1):
            target = await _checked(url, current, rules)
            response = await _get(client, target, url)
            try:
                if response.status_code in REDIRECTS and "location" in response.headers:
                    current = str(target.url.join(response.headers["location"]))
                    continue
                if not 200 <= response.status_code < 300:
                    raise _unreachable(url, f"the images URL answered {response.status_code}",
                                       status=response.status_code)  # fmt: skip
                return await _save(response, target, path, rules, url)
            finally:
                await response.aclose()
    raise InvalidSpec(
        f"the images URL redirects more than {rules.max_redirects} times", code="images_url_refused",
        details={"url": redacted(url), "max_redirects": rules.max_redirects},
    )  # fmt: skip


def _client(rules: FetchRules) -> httpx.AsyncClient:
    """No redirects followed by httpx, no proxies from the environment, no connection reuse (each connection goes
    to one checked address), and no compressed answer asked for."""
    return httpx.AsyncClient(
        verify=rules.ssl_context,
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(rules.timeout_s),
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"accept-encoding": "identity", "user-agent": USER_AGENT},
    )


async def _checked(url: str, current: str, rules: FetchRules) -> Target:
    """`current` (the URL, or where it redirected) checked: its scheme before any resolution, then every address
    its host resolves to."""
    where = "the images URL" if current == url else f"the images URL redirects to {redacted(current)}, which"
    details = {"url": redacted(url)} | ({} if current == url else {"redirect": redacted(current)})
    try:
        scheme = parse_url(current, IMAGES).scheme
        if scheme != "https" and not rules.allow_http:
            raise InvalidSpec(f"{where} must use https://", code="images_url_refused", details=details)
        return await to_thread.run_sync(check_target, current, rules.policy, rules.resolver, IMAGES,
                                        abandon_on_cancel=True)  # fmt: skip
    except UrlInvalid as exc:
        code = "images_url_invalid" if current == url else "images_url_refused"
        raise InvalidSpec(_reason(where, exc, current == url), code=code, details=details) from None
    except HostUnresolved as exc:
        raise InvalidSpec(
            _reason(where, exc, current == url), code="images_url_unreachable", details=details
        ) from None
    except TargetError as exc:
        raise InvalidSpec(_reason(where, exc, current == url), code="images_url_refused", details=details) from None


def _reason(where: str, exc: Exception, first: bool) -> str:
    return str(exc) if first else f"{where} is refused: {exc}"


async def _get(client: httpx.AsyncClient, target: Target, url: str) -> httpx.Response:
    """GET `target` through its checked addresses in order (the next one after a failed connection); the answer
    with its head read and its body not yet."""
    failure: httpx.TransportError | None = None
    for address in target.addresses:
        request = client.build_request(
            "GET",
            target.pinned_url(address),
            headers={"host": target.host_header},
            extensions={} if target.host_is_address else {"sni_hostname": target.host},
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:  # refused, unreachable, or TLS (a certificate not for the name)
            failure = exc
    raise _unreachable(url, f"the images URL cannot be reached ({failure})")


async def _save(response: httpx.Response, target: Target, path: Path, rules: FetchRules, url: str) -> UploadedFile:
    """Writes the answer's body to `path` as it arrives, counting every byte against the cap; then it must be a
    zip or tar archive."""
    name = PurePosixPath(target.url.path).name or FILE_NAME
    fetched = UploadedFile(index=0, filename=name, safe_name=safe_display_name(name, 0, set()), path=path)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > rules.max_bytes:
        raise _too_large(url, rules, declared=int(declared))
    with path.open("wb") as out:
        async for chunk in response.aiter_raw():  # raw: as sent, never decompressed
            fetched.size += len(chunk)
            if fetched.size > rules.max_bytes:
                raise _too_large(url, rules)
            out.write(chunk)
            fetched.digest.update(chunk)
    if archive_kind(str(path)) is None:
        reason = "not a zip or tar archive (the images URL must name one .zip, .tar or .tar.gz)"
        raise InvalidRequest(f"{fetched.safe_name}: {reason}", code="archive_invalid",
                             details={"file": fetched.safe_name, "member": "", "reason": reason})  # fmt: skip
    return fetched


def _unreachable(url: str, message: str, *, status: int | None = None) -> InvalidSpec:
    details: dict[str, Any] = {"url": redacted(url)} | ({"status": status} if status is not None else {})
    return InvalidSpec(message, code="images_url_unreachable", details=details)


def _too_large(url: str, rules: FetchRules, *, declared: int | None = None) -> PayloadTooLarge:
    size = f" ({declared} bytes)" if declared is not None else ""
    return PayloadTooLarge(
        f"the images URL's archive{size} is larger than the limit of {rules.max_bytes} bytes",
        code="images_url_too_large", details={"url": redacted(url), "limit": rules.max_bytes},
    )  # fmt: skip
