"""A client of the dopsd fine-tuning API: `DOPSDClient` for programs, `dopsd client ...` on the command line.

It speaks only the REST API (httpx): no service code and no torch, so it installs anywhere.
"""

from __future__ import annotations

from dopsd_client.api import DOPSDAPIError, DOPSDClient


__all__ = ["DOPSDAPIError", "DOPSDClient"]
