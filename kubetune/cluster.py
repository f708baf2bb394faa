"""A live cluster's GPU inventory for `kubetune plan --kubeconfig/--context`: its Nodes, read with the user's
kubeconfig through kubernetes-asyncio (imported lazily; it ships with the operator extra)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from kubetune.errors import KubetuneError
from kubetune.planning.placement import Inventory, inventory_of


@asynccontextmanager
async def _api_client(kubeconfig: str | None, context: str | None, purpose: str) -> AsyncIterator[Any]:
    """An ApiClient from the user's kubeconfig (kubernetes-asyncio, imported here: the operator extra ships it);
    its `configuration.host` names the cluster in messages."""
    try:
        from kubernetes_asyncio import client, config
    except ImportError:
        raise KubetuneError(f"{purpose} need kubernetes-asyncio: pip install 'kubetune[operator]'") from None
    configuration = client.Configuration()
    try:
        await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = kubeconfig or "the default kubeconfig"
        raise KubetuneError(f"--kubeconfig {where}" + (f" --context {context}" if context else "")
                            + f": cannot load it: {exc}") from None
    async with client.ApiClient(configuration) as api:
        yield api


async def _list_nodes(kubeconfig: str | None, context: str | None) -> list[dict[str, Any]]:
    async with _api_client(kubeconfig, context, "--kubeconfig/--context") as api:
        from kubernetes_asyncio import client

        try:
            nodes = await client.CoreV1Api(api).list_node()
        except Exception as exc:  # ApiException, connection and TLS errors: all mean the same to the user
            raise KubetuneError(f"cannot list Nodes at {api.configuration.host}: {exc}".strip()) from None
        return [api.sanitize_for_serialization(node) for node in nodes.items]


def read_inventory(kubeconfig: str | None, context: str | None) -> Inventory:
    """The cluster's Nodes (labels, allocatable GPUs, schedulability), for planning against what it has."""
    return inventory_of(asyncio.run(_list_nodes(kubeconfig, context)), [])


async def _get_job(kubeconfig: str | None, context: str | None, namespace: str, name: str) -> dict[str, Any]:
    from kubetune.spec import API_GROUP, API_VERSION, PLURAL

    async with _api_client(kubeconfig, context, "reading a FineTuneJob from the cluster") as api:
        from kubernetes_asyncio import client

        job, host = f"finetunejob {namespace}/{name}", api.configuration.host
        try:
            obj = await client.CustomObjectsApi(api).get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                raise KubetuneError(f"{job} not found at {host}") from None
            raise KubetuneError(f"cannot read {job} at {host}: {exc.status} {exc.reason}") from None
        except Exception as exc:  # connection and TLS errors
            raise KubetuneError(f"cannot read {job} at {host}: {exc}") from None
        return dict(obj)


def read_job(kubeconfig: str | None, context: str | None, namespace: str, name: str) -> dict[str, Any]:
    """One FineTuneJob as the cluster stores it (spec and status), read with the user's kubeconfig."""
    return asyncio.run(_get_job(kubeconfig, context, namespace, name))
