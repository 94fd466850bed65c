"""`dopsd client usage` and `DOPSDClient.usage()` against the real stack: what a key stores and has used."""

from __future__ import annotations

from dopsd_client import DOPSDClient
from tests.client.test_client_cli import dopsd_client
from tests.conftest import EXAMPLES, Stack, quick_spec
from tests.pace import eventually


def test_usage_shows_what_the_key_stores(prod_stack: Stack) -> None:
    key = prod_stack.create_key("client-usage")
    empty = dopsd_client(prod_stack, key, "usage")
    assert empty.returncode == 0, empty.stderr
    assert "stored:      0 B of 20.0 GB" in empty.stdout and "jobs:        none" in empty.stdout, empty.stdout
    with DOPSDClient(prod_stack.base_url, key) as client:
        job = client.submit([EXAMPLES / "robot-1.png"], quick_spec(steps=5000))
        try:
            usage = client.usage()
            assert usage["stored_bytes"] == job["images"][0]["size"], usage
            assert usage["jobs"] in ({"queued": 1}, {"running": 1}), usage
            shown = dopsd_client(prod_stack, key, "usage")
            assert f"stored:      {usage['stored_bytes']} B of 20.0 GB" in shown.stdout, shown.stdout
        finally:
            client.delete(job["id"])
        # A deleted job counts until its worker has stopped (and removed what it stored).
        eventually(lambda: client.usage()["stored_bytes"], lambda n: n == 0, "usage after the delete")
