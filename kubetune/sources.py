"""Where planning's inputs come from: a model's config.json on the hub or in S3 (network reads).

`kubetune.planning` decides and never touches the network; the fronts (the CLI, the REST API, the operator and
`kubetune train`) call `model_architecture` here, then plan with the architecture it returns.
"""

from __future__ import annotations

import asyncio

from kubetune.errors import HubUnreachable
from kubetune.planning.models import Architecture, resolve_architecture


def model_architecture(name: str | None, source: str | None, revision: str | None = None) -> Architecture:
    """resolve_architecture with config.json readable from s3:// (boto3 imported only for s3:// sources) and,
    for a hub id the catalog does not know, from the hub (HF_ENDPOINT, HF_TOKEN; kubetune.hub_config).

    The CLI, the REST API, the operator and `kubetune train` all plan through this one call. It blocks (the
    hub read has a timeout); an event loop calls `model_architecture_async`."""
    from kubetune.hub_config import read_hub_config
    from kubetune.s3 import read_s3_config

    return resolve_architecture(name, source, read_s3_config, read_hub_config, revision)


async def model_architecture_async(name: str | None, source: str | None, revision: str | None = None,
                                   timeout: float = 10.0) -> Architecture:
    """`model_architecture` off the event loop (a worker thread), bounded by `timeout`: the operator and the
    REST API plan a hub id the catalog does not know without stalling their other work."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(model_architecture, name, source, revision), timeout)
    except TimeoutError:
        raise HubUnreachable(f"spec.model: reading the config.json of {name or source!r} took over "
                             f"{timeout:g}s") from None
