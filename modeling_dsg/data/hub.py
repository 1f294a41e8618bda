"""The Hugging Face Hub as a source: repo ids, data-set specs and the reachability probe, in one place.

- A repo id is `OWNER/NAME` as the Hub spells it (`REPO_ID`).
- A data set is named `NAME[:CONFIG][@SPLIT]` (`DATASET_SPEC`); the default split depends on the use
  (text corpora read `train`, multiple-choice sets `test`).
- Before anything is fetched, `require_hub` fails in seconds with one clear line when downloads are off
  (`HF_HUB_OFFLINE`) or the endpoint does not accept a connection within `HUB_TIMEOUT_S`.
"""

from __future__ import annotations

import re
import socket
from typing import NamedTuple
from urllib.parse import urlparse

from ..errors import DSGError

HUB_TIMEOUT_S = 5.0  # seconds a TCP connection to the Hub endpoint may take before the Hub counts as unreachable
REPO_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
DATASET_SPEC = re.compile(r"([\w.\-]+(?:/[\w.\-]+)?)(?::([\w.\-]+))?(?:@([\w.\-\[\]:%+]+))?")


class DatasetSpec(NamedTuple):
    """A Hub data set named as `NAME[:CONFIG][@SPLIT]`."""

    name: str
    config: str | None
    split: str


def is_repo_id(text: str) -> bool:
    """True if `text` has the shape of a Hub repo id, `OWNER/NAME`."""
    return bool(REPO_ID.fullmatch(text))


def parse_dataset_spec(spec: str, default_split: str) -> DatasetSpec | None:
    """`NAME[:CONFIG][@SPLIT]` split into its parts (`default_split` when none is given); None if it is not one."""
    m = DATASET_SPEC.fullmatch(spec)
    return DatasetSpec(m.group(1), m.group(2), m.group(3) or default_split) if m else None


def connect(endpoint: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """Open (and close) a TCP connection to the Hub `endpoint`; `OSError` if none opens within `timeout` s."""
    url = urlparse(endpoint)
    if not url.hostname:
        raise DSGError(f"bad Hub endpoint {endpoint!r} (check HF_ENDPOINT)")
    port = url.port or (80 if url.scheme == "http" else 443)
    socket.create_connection((url.hostname, port), timeout=timeout).close()


def hub_offline() -> bool:
    """True if Hub downloads are disabled (HF_HUB_OFFLINE) or the endpoint does not answer within seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    try:
        connect(constants.ENDPOINT)
    except (OSError, DSGError):
        return True
    return False


def require_hub(spec: str, what: str, hint: str) -> None:
    """`DSGError` ("cannot reach the Hugging Face Hub to fetch ...", then `hint`) if the Hub is not reachable."""
    if hub_offline():
        raise DSGError(f"cannot reach the Hugging Face Hub to fetch {what} {spec!r}; {hint}")
