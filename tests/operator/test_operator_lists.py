"""What the operator asks the API server for when it (re)lists: pages (kopf's chunk_size, so a restart with
thousands of resident jobs never parses one huge LIST), and for Jobs only its own trainer Jobs (a label
selector the server applies: the cluster's other Jobs never reach the operator). The emulator records every
LIST and WATCH request as kube-apiserver would receive it."""

from __future__ import annotations

from kt_cluster import NS, Cluster, eventually
from kubetune_operator.main import LIST_CHUNK

from kubetune import wire

MANAGED = ",".join(f"{key}={value}" for key, value in wire.MANAGED.items())


def job(name: str, labels: dict[str, str]) -> dict[str, object]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"template": {"spec": {"containers": []}}}}


async def test_the_operator_lists_in_pages_and_only_its_own_jobs(cluster: Cluster) -> None:
    for index in range(LIST_CHUNK + 20):
        await cluster.api.put_object("jobs", job(f"trainer-{index:04d}", {**wire.MANAGED, wire.JOB_LABEL: "x"}))
    await cluster.api.put_object("jobs", job("someone-elses", {"app": "etl"}))
    await cluster.start_operator()
    await eventually(lambda: any(r[:2] == ("WATCH", "jobs") for r in cluster.api.reads), 20, "the Job watch")

    jobs = [(verb, params) for verb, plural, params in cluster.api.reads if plural == "jobs"]
    lists = [params for verb, params in jobs if verb == "LIST"]
    assert [p.get("limit") for p in lists] == [str(LIST_CHUNK)] * 2, lists
    assert "continue" not in lists[0] and lists[1].get("continue"), "the second page follows the first's token"
    assert not cluster.api.pages, "every page was fetched"
    assert all(params.get("labelSelector") == MANAGED for _, params in jobs), jobs
    pods = [params for verb, plural, params in cluster.api.reads if (verb, plural) == ("LIST", "pods")]
    assert pods and all(p.get("limit") == str(LIST_CHUNK) and "labelSelector" not in p for p in pods), \
        "every pod is listed (the GPUs pods hold decide placement), in pages"
