"""A hub model's config.json, for planning a hub id the catalog does not know.

Read from the same endpoint and with the same token the trainer will use: HF_ENDPOINT (or the operator's
KUBETUNE_HF_ENDPOINT, which the chart's `hub.endpoint` sets) and HF_TOKEN. Only the standard library
(urllib), so the CLI, the REST API and the operator can all call it without the trainer's packages.

`read_hub_config` blocks (with a timeout); `read_hub_config_async` runs it in a worker thread under
`asyncio.wait_for`, so an event loop (the operator, the API) never waits on the network.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from kubetune.errors import HubUnreachable, SpecError

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_SECONDS = 10.0
MAX_CONFIG_BYTES = 4 * 2**20  # config.json files are a few KB
TOKEN_HINT = "set HF_TOKEN (in a cluster: spec.model.tokenSecret, or the chart's hub.tokenSecret)"


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or os.environ.get("KUBETUNE_HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def config_url(name: str, revision: str | None, endpoint: str) -> str:
    return f"{endpoint}/{name}/resolve/{quote(revision or 'main', safe='')}/config.json"


def read_hub_config(name: str, revision: str | None = None, *, endpoint: str | None = None,
                    token: str | None = None, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """config.json of hub repo `name` at `revision` (default main). A missing, gated or private repo is a
    SpecError naming what to set; no answer within `timeout` is HubUnreachable."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    token = token if token is not None else os.environ.get("HF_TOKEN")
    request = urllib.request.Request(config_url(name, revision, endpoint),
                                     headers={"User-Agent": "kubetune-planner"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_CONFIG_BYTES + 1)
    except urllib.error.HTTPError as exc:
        code = exc.headers.get("X-Error-Code", "")
        if code == "GatedRepo" or (exc.code in (401, 403) and code != "RepoNotFound"):
            told = "refused the token in HF_TOKEN" if token else "needs a token and none is set"
            raise SpecError(f"spec.model.name: {name!r} is gated on {endpoint}: the hub {told}; {TOKEN_HINT}") from None
        if code == "RevisionNotFound":
            raise SpecError(f"spec.model.revision: {revision!r} is not a branch, tag or commit of {name!r} "
                            f"on {endpoint}") from None
        if exc.code in (401, 404):
            raise SpecError(f"spec.model.name: {name!r} does not exist on {endpoint}, or it is private and "
                            + ("the token has no access" if token else "no token is set") + f"; {TOKEN_HINT}") from None
        raise HubUnreachable(f"spec.model.name: {endpoint} answered HTTP {exc.code} for {name!r}'s "
                             "config.json") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HubUnreachable(f"spec.model.name: cannot read {name!r}'s config.json from {endpoint} ({reason}); "
                             "check HF_ENDPOINT and the network") from None
    if len(body) > MAX_CONFIG_BYTES:
        raise SpecError(f"spec.model.name: {name!r}'s config.json is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(body)
    except ValueError:
        raise SpecError(f"spec.model.name: {name!r}'s config.json on {endpoint} is not JSON") from None
    if not isinstance(config, dict):
        raise SpecError(f"spec.model.name: {name!r}'s config.json on {endpoint} is not a JSON object")
    return config


async def read_hub_config_async(name: str, revision: str | None = None, *, endpoint: str | None = None,
                                token: str | None = None, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any]:
    """`read_hub_config` off the event loop, bounded by `timeout` in total."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(read_hub_config, name, revision, endpoint=endpoint,
                                                        token=token, timeout=timeout), timeout)
    except TimeoutError:
        raise HubUnreachable(f"spec.model.name: no answer for {name!r}'s config.json from "
                             f"{(endpoint or hub_endpoint())} within {timeout:g}s") from None
