"""One webhook POST that a receiver cannot turn against the sender.

It connects only to the addresses that were checked (the URL's host stays in the Host header and the TLS server
name, so certificates are verified against the name); it reads at most a few bytes of the answer and never
decompresses it (a 1 MB gzip answer that expands to 1 GiB costs nothing); redirects are not followed and the
environment's proxies are not used. The caller bounds the attempt's total time (a receiver that sends a byte
every few seconds never trips a per-read timeout).
"""

from __future__ import annotations

import functools
import ssl

import anyio
import certifi
import httpx

from core.webhooks.targets import Target


USER_AGENT = "dopsd-webhooks/1"


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The TLS settings of deliveries: certificates verified against certifi's CA bundle (made once)."""
    return ssl.create_default_context(cafile=certifi.where())


def sender_client(*, timeout_s: float, max_connections: int, ssl_context: ssl.SSLContext | None) -> httpx.AsyncClient:
    """The HTTP client of one sender pass: no redirects, no proxies from the environment, no connection reuse (a
    connection is opened to one checked address for one request), and no compressed answers asked for."""
    return httpx.AsyncClient(
        verify=ssl_context or default_ssl_context(),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
        headers={"accept-encoding": "identity", "user-agent": USER_AGENT},
    )


async def post_pinned(
    client: httpx.AsyncClient,
    target: Target,
    body: bytes,
    headers: dict[str, str],
    *,
    deadline: float,
    max_response_bytes: int,
) -> int:
    """POSTs `body` to `target` through its checked addresses in order (the next one after a failed connection)
    and returns the receiver's status code; `TimeoutError` when no answer's head came by `deadline` (anyio's
    clock). Up to `max_response_bytes` of the answer's body are then read, as they arrive on the wire, until the
    deadline, and dropped; the connection is closed after the answer."""
    failure: httpx.TransportError | None = None
    for address in target.addresses:
        request = client.build_request(
            "POST",
            target.url.copy_with(host=str(address)),
            content=body,
            headers={**headers, "host": target.url.netloc.decode("ascii")},
            extensions={} if target.host_is_address else {"sni_hostname": target.host},
        )
        try:
            with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                response = await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            failure = exc
            continue
        try:
            with anyio.CancelScope(deadline=deadline):
                await _read_at_most(response, max_response_bytes)
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()
        return response.status_code
    assert failure is not None  # a target has at least one address
    raise failure


async def _read_at_most(response: httpx.Response, limit: int) -> None:
    read = 0
    if limit <= 0:
        return
    async for chunk in response.aiter_raw():  # raw: as sent, never decompressed
        read += len(chunk)
        if read >= limit:
            return
