"""The ModelScope hub's endpoint, and whether it can be reached: asked before a model or dataset
download, so that an offline host fails in seconds, not after the hub client's minutes of retries,
naming every download the run still needs (StillNeeded)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class HubDownload:
    """One ModelScope download a run needs: the repository, the folder a copy goes to, and the
    config key that points the run at that copy instead of the hub."""

    kind: str  # "model" | "dataset"
    repo_id: str
    folder: str
    config_key: str

    def fetch_command(self) -> str:
        """The command that fetches it on a machine with network (modelscope_hub's CLI flags)."""
        kind = " --repo-type dataset" if self.kind == "dataset" else ""
        return f"modelscope download{kind} {self.repo_id} --local-dir {self.folder}"

    def line(self) -> str:
        # A dataset is read from its copy only with source: local (source: modelscope always asks the hub)
        use = (f"then set dataset.source: local and {self.config_key}: {self.folder}" if self.kind == "dataset"
               else f"found there as it is; or set {self.config_key} to another folder that holds it")
        return f"{self.kind} {self.repo_id} -> {self.folder} ({use}): {self.fetch_command()}"


class StillNeeded:
    """Every hub download a run still needs, in a fixed order, so that whichever download job fails
    first names them all. A plain object rather than a list on purpose: Snakemake leaves a param it
    cannot repr out of its rerun check, so a download finished since does not rerun every job that
    carries the list."""

    def __init__(self, items: Iterable[HubDownload]) -> None:
        self.items: tuple[HubDownload, ...] = tuple(sorted(set(items), key=lambda d: (d.kind != "model", d.repo_id)))

    def __iter__(self) -> Iterator[HubDownload]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"StillNeeded({[d.repo_id for d in self.items]})"

    def text(self) -> str:
        """The list as the offline error shows it: one line per download."""
        lines = "\n".join(f"  - {d.line()}" for d in self.items)
        return (f"This run still needs {len(self.items)} download(s) from ModelScope; on a machine with network, "
                f"fetch each and carry its folder over (docs/troubleshooting.md):\n{lines}")
