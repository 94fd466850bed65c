"""Webhook URLs at submission, in process: a malformed one (an out-of-range port, a broken IPv6 literal) and
one whose host is an IPv6 form embedding a private IPv4 address (NAT64, 6to4, IPv4-compatible) are refused with
422 and the one error shape, and create nothing."""

from __future__ import annotations

import json

import pytest

from tests.api.local_api import LocalApi
from tests.conftest import example_files, quick_spec


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://hooks.example:99999/hook", "webhook_url_invalid"),
        ("https://hooks.example:0/hook", "webhook_url_invalid"),
        ("http://[::1/hook", "webhook_url_invalid"),
        ("http://[fe80::zz]/hook", "webhook_url_invalid"),
        ("http://hooks exam.ple/hook", "webhook_url_invalid"),
        ("http://[64:ff9b::7f00:1]/hook", "webhook_url_refused"),
        ("http://[2002:a00:1::1]/hook", "webhook_url_refused"),
        ("http://[::127.0.0.1]/hook", "webhook_url_refused"),
        ("http://[::ffff:169.254.169.254]/latest/meta-data", "webhook_url_refused"),
    ],
)
def test_malformed_or_disguised_private_webhook_urls_answer_422(local_api: LocalApi, url: str, code: str) -> None:
    assert local_api.settings.webhook_allow_private is False
    before, messages = local_api.stored(), local_api.messages()
    with local_api.client(local_api.create_key(f"hook-{code}")) as client:
        spec = json.dumps(quick_spec(webhook_url=url))
        answer = client.post("/v1/jobs", files=[*example_files(1), ("spec", (None, spec))])
        assert answer.status_code == 422, answer.text
        body = answer.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
        assert body["error"]["code"] == code and body["error"]["message"]
        assert client.get("/v1/jobs").json()["data"] == []
    assert local_api.stored() == before and local_api.messages() == messages
