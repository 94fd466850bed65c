"""What clients see of stored event data: sample images and contact sheets are stored by object key and turned
into short-lived download URLs when read (an event stays readable after any URL in it would have expired). The
events endpoint, the server-sent stream and webhooks all go through here."""

from __future__ import annotations

from typing import Any

from core.storage import LocalStore, S3Store


def public_event_data(type_: str, data: dict[str, Any], store: LocalStore | S3Store, ttl_s: int) -> dict[str, Any]:
    """`data` with every stored object key replaced by a download URL valid for `ttl_s` seconds."""
    if type_ != "sample":
        return data

    def url(key: str, name: str) -> str:
        return store.download_url(key, filename=name.rsplit("/", 1)[-1], ttl_s=ttl_s)

    out = {k: v for k, v in data.items() if k not in ("images", "contact_sheet_key")}
    out["images"] = [
        {**{k: v for k, v in image.items() if k != "key"}, "url": url(image["key"], image["name"])}
        for image in data.get("images", [])
    ]
    if data.get("contact_sheet_key"):
        out["contact_sheet"] = url(data["contact_sheet_key"], "contact_sheet.png")
    out["expires_in_s"] = ttl_s
    return out
