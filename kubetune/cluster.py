"""A live cluster's GPU inventory for `kubetune plan --kubeconfig/--context`: its Nodes, read with the user's
kubeconfig through kubernetes-asyncio (imported lazily; it ships with the operator extra)."""

from __future__ import annotations

import asyncio
from typing import Any

from kubetune.errors import KubetuneError
from kubetune.planning.placement import Inventory, inventory_of


async def _list_nodes(kubeconfig: str | None, context: str | None) -> list[dict[str, Any]]:
    try:
        from kubernetes_asyncio import client, config
    except ImportError:
        raise KubetuneError("--kubeconfig/--context need kubernetes-asyncio: "
                            "pip install 'kubetune[operator]'") from None
    configuration = client.Configuration()
    try:
        await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        where = kubeconfig or "the default kubeconfig"
        raise KubetuneError(f"--kubeconfig {where}" + (f" --context {context}" if context else "")
                            + f": cannot load it: {exc}") from None
    async with client.ApiClient(configuration) as api:
        try:
            nodes = await client.CoreV1Api(api).list_node()
        except Exception as exc:  # ApiException, connection and TLS errors: all mean the same to the user
            raise KubetuneError(f"cannot list Nodes at {configuration.host}: {exc}".strip()) from None
        return [api.sanitize_for_serialization(node) for node in nodes.items]


def read_inventory(kubeconfig: str | None, context: str | None) -> Inventory:
    """The cluster's Nodes (labels, allocatable GPUs, schedulability), for planning against what it has."""
    return inventory_of(asyncio.run(_list_nodes(kubeconfig, context)), [])


async def _get_job(kubeconfig: str | None, context: str | None, namespace: str, name: str) -> dict[str, Any]:
    from kubetune.spec import API_GROUP, API_VERSION, PLURAL

    try:
        from kubernetes_asyncio import client, config
    except ImportError:
        raise KubetuneError("reading a FineTuneJob from the cluster needs kubernetes-asyncio: "
                            "pip install 'kubetune[operator]'") from None
    configuration = client.Configuration()
    try:
        await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    except (config.ConfigException, OSError) as exc:
        raise KubetuneError(f"--kubeconfig {kubeconfig or 'the default kubeconfig'}: cannot load it: {exc}") from None
    async with client.ApiClient(configuration) as api:
        try:
            obj = await client.CustomObjectsApi(api).get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                raise KubetuneError(f"finetunejob {namespace}/{name} not found at {configuration.host}") from None
            raise KubetuneError(f"cannot read finetunejob {namespace}/{name} at {configuration.host}: "
                                f"{exc.status} {exc.reason}") from None
        except Exception as exc:  # connection and TLS errors
            raise KubetuneError(f"cannot read finetunejob {namespace}/{name} at {configuration.host}: {exc}") from None
        return dict(obj)


def read_job(kubeconfig: str | None, context: str | None, namespace: str, name: str) -> dict[str, Any]:
    """One FineTuneJob as the cluster stores it (spec and status), read with the user's kubeconfig."""
    return asyncio.run(_get_job(kubeconfig, context, namespace, name))
