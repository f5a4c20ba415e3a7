"""The ModelScope hub's endpoint, and whether it can be reached: asked before a model or dataset
download, so that an offline host fails in seconds, not after the hub client's minutes of retries."""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlparse

PREFLIGHT_TIMEOUT_S = 10.0


def endpoint() -> str:
    """The endpoint snapshot_download and MsDataset.load talk to: HubApi's (it honours
    MODELSCOPE_ENDPOINT). Not `modelscope.hub.utils.utils.get_endpoint()`, which ignores it."""
    from modelscope.hub.api import HubApi

    return HubApi().endpoint


def offline_reason() -> str | None:
    """Why the ModelScope hub cannot be reached, or None if a TCP connection opens.

    A plain connect bounded by PREFLIGHT_TIMEOUT_S answers in seconds. Behind a proxy a direct
    connect proves nothing, so the check is skipped there and the client's own error is reported.
    """
    url = endpoint()
    parsed = urlparse(url)
    if urllib.request.getproxies().get(parsed.scheme or "https"):
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=PREFLIGHT_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot connect to {url} ({exc})"
    return None
