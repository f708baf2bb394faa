"""The test kubelet, scheduler and Job controller behave as a cluster does, with small shell/python pods."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import aiohttp
import pytest
from kt_cluster import NS, Cluster, eventually
from kt_jobs import failure_action
from kt_kubelet import Kubelet, map_path
from kt_scheduling import schedule

PY = sys.executable


def job(name: str, script: str, *, shell: bool = True, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "busybox",
                                 "command": ["sh", "-c", script] if shell else ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    pod_spec.update(spec.pop("pod", {}))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS},
            "spec": {"backoffLimit": 0, **spec, "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec}}}


async def create(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
    code, created = await cluster.request("POST", f"/apis/batch/v1/namespaces/{NS}/jobs", body)
    assert code == 201, created
    return dict(created)


def pods(cluster: Cluster, job_name: str) -> list[dict[str, Any]]:
    return sorted(cluster.api.items("pods", NS, f"batch.kubernetes.io/job-name={job_name}"),
                  key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["resourceVersion"])


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return dict(cond)
    return None


async def finished(cluster: Cluster, name: str, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = cluster.api.read("jobs", NS, name)
        return found if condition(found, "Complete") or condition(found, "Failed") else None
    return dict(await eventually(check, timeout, f"job {name} to finish"))


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"]["terminated"])


async def test_env_secrets_volumes_paths_and_termination_message(cluster: Cluster, kubelet: Kubelet) -> None:
    await cluster.api.put_object("secrets", {"apiVersion": "v1", "kind": "Secret",
                                             "metadata": {"name": "creds", "namespace": NS},
                                             "stringData": {"token": "s3cr3t"}})
    await cluster.api.put_object("configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                                "metadata": {"name": "cfg", "namespace": NS},
                                                "data": {"job.json": '{"steps": 3}'}})
    script = ('import os, pathlib\n'
              'cfg = pathlib.Path("/etc/app/job.json")\n'  # a literal container path: not rewritten
              'print("literal exists:", cfg.exists())\n'
              'data = pathlib.Path(os.environ["CONFIG"]).read_text()\n'
              'pathlib.Path(os.environ["SCRATCH"]).write_text("x")\n'
              'pathlib.Path(os.environ["MSG"]).write_text(os.environ["TOKEN"] + "|" + data + "|" + os.environ["WHO"]'
              ' + "|" + os.environ["POD"] + "|" + os.environ["TMPDIR"])\n')
    body = job("envjob", script, shell=False, container={
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "CONFIG", "value": "/etc/app/job.json"},
                {"name": "SCRATCH", "value": "/tmp/out.txt"},
                {"name": "NAME", "value": "kube"}, {"name": "WHO", "value": "hello-$(NAME)"},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MSG", "value": "/dev/termination-log"}],
        "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": True},
                         {"name": "scratch", "mountPath": "/tmp"}],
        "terminationMessagePath": "/dev/termination-log",
    }, pod={"volumes": [{"name": "config", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}]})
    await create(cluster, body)
    done = await finished(cluster, "envjob")
    assert condition(done, "Complete") and condition(done, "SuccessCriteriaMet")
    assert done["status"]["succeeded"] == 1 and done["status"]["active"] == 0
    [pod] = pods(cluster, "envjob")
    assert pod["status"]["phase"] == "Succeeded" and pod["status"]["podIP"].startswith("127.")
    state = terminated(pod)
    assert state["exitCode"] == 0 and state["reason"] == "Completed"
    token, data, who, name, tmpdir = state["message"].split("|")
    assert (token, data, who, name) == ("s3cr3t", '{"steps": 3}', "hello-kube", pod["metadata"]["name"])
    assert tmpdir.startswith(str(kubelet.root)) and (kubelet.root / "pods" / f"{NS}_{name}" / "volumes" /
                                                     "scratch" / "out.txt").exists()
    assert "literal exists: False" in kubelet.log(NS, name)  # only env/args/workingDir paths are mapped
    assert pod["spec"]["nodeName"] and "finalizers" not in pod["metadata"]  # counted, tracking finalizer gone


async def test_missing_secret_waits_then_runs(cluster: Cluster, kubelet: Kubelet) -> None:
    await create(cluster, job("waits", 'echo $TOKEN > "$MSG"', container={
        "env": [{"name": "MSG", "value": "/dev/termination-log"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "t"}}},
                {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "t", "optional": True}}}]}))

    def waiting() -> Any:
        found = pods(cluster, "waits")
        statuses = found[0]["status"].get("containerStatuses") if found else None
        return statuses and statuses[0]["state"].get("waiting")
    state = await eventually(waiting, 10, "CreateContainerConfigError")
    assert state == {"reason": "CreateContainerConfigError", "message": 'secret "later" not found'}
    await cluster.api.put_object("secrets", {"apiVersion": "v1", "kind": "Secret",
                                             "metadata": {"name": "later", "namespace": NS}, "stringData": {"t": "ok"}})
    await finished(cluster, "waits")
    assert terminated(pods(cluster, "waits")[0])["message"].strip() == "ok"


async def test_backoff_limit_counts_failures(cluster: Cluster, kubelet: Kubelet) -> None:
    await create(cluster, job("flaky", "echo boom; exit 7", backoffLimit=2,
                              container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    done = await finished(cluster, "flaky")
    failed = condition(done, "Failed")
    assert failed and failed["reason"] == "BackoffLimitExceeded" and condition(done, "FailureTarget")
    assert done["status"]["failed"] == 3 and len(pods(cluster, "flaky")) == 3  # the first try + backoffLimit retries
    for pod in pods(cluster, "flaky"):
        assert terminated(pod)["exitCode"] == 7 and terminated(pod)["message"] == "boom"  # message from the log


async def test_pod_failure_policy(cluster: Cluster, kubelet: Kubelet) -> None:
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In",
                                                              "values": [2, 3]}},
                        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                        {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [143]}}]}
    await create(cluster, job("oom", "exit 3", backoffLimit=5, podFailurePolicy=policy))
    done = await finished(cluster, "oom")
    assert condition(done, "Failed")["reason"] == "PodFailurePolicy"  # type: ignore[index]
    assert len(pods(cluster, "oom")) == 1 and done["status"]["failed"] == 1
    assert "exit code 3 matching FailJob rule at index 0" in condition(done, "Failed")["message"]  # type: ignore[index]

    # Exit 143 (a preempted trainer) and an eviction are ignored: not counted, the pod is replaced.
    script = 'if [ -e "$MARK/second" ]; then exit 0; fi; if [ -e "$MARK/first" ]; then touch "$MARK/second"; ' \
             'sleep 60; fi; touch "$MARK/first"; exit 143'
    await cluster.api.put_object("persistentvolumeclaims", {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                                            "metadata": {"name": "marks", "namespace": NS}})
    await create(cluster, job("preempt", script, backoffLimit=0, podFailurePolicy=policy,
                              container={"env": [{"name": "MARK", "value": "/marks"}],
                                         "volumeMounts": [{"name": "m", "mountPath": "/marks"}]},
                              pod={"volumes": [{"name": "m", "persistentVolumeClaim": {"claimName": "marks"}}],
                                   "terminationGracePeriodSeconds": 5}))
    second = await eventually(lambda: len(pods(cluster, "preempt")) == 2 and
                              pods(cluster, "preempt")[1]["status"].get("phase") == "Running" and
                              (kubelet.root / "pvcs" / f"{NS}_marks" / "second").exists() and
                              pods(cluster, "preempt")[1], 20, "the replacement pod")
    await kubelet.evict(NS, second["metadata"]["name"])
    done = await finished(cluster, "preempt")
    assert condition(done, "Complete") and done["status"]["failed"] == 0 and done["status"]["succeeded"] == 1
    codes = [terminated(p)["exitCode"] for p in pods(cluster, "preempt")]
    assert codes == [143, 0]  # the evicted pod is gone (deleted); its exit code (143 on SIGTERM) was not counted
    assert failure_action({"status": {"conditions": [{"type": "DisruptionTarget", "status": "True"}]}},
                          policy) == ("Ignore", 1)


async def test_delete_sends_sigterm_then_sigkill(cluster: Cluster, kubelet: Kubelet) -> None:
    graceful = 'trap "echo got TERM > $MSG; exit 143" TERM; echo started; ' \
               'while true; do sleep 0.1; done'
    stubborn = 'trap "" TERM; echo started; while true; do sleep 0.1; done'
    for name, script in (("graceful", graceful), ("stubborn", stubborn)):
        await create(cluster, job(name, script, pod={"terminationGracePeriodSeconds": 1}, container={
            "env": [{"name": "MSG", "value": "/dev/termination-log"}]}))
    for name in ("graceful", "stubborn"):
        await eventually(lambda n=name: pods(cluster, n) and "started" in kubelet.log(NS, pods(cluster, n)[0]
                                                                                      ["metadata"]["name"]),
                         20, f"{name} to start")
    seen: dict[str, dict[str, Any]] = {}
    for name in ("graceful", "stubborn"):
        pod = pods(cluster, name)[0]
        seen[name] = pod
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, body = await cluster.request("DELETE", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}")
        assert code == 200 and body["metadata"]["deletionTimestamp"]
        assert body["metadata"]["deletionGracePeriodSeconds"] == 1
        await eventually(lambda p=pod: cluster.api.read("pods", NS, p["metadata"]["name"]) is None, 10,
                         f"{name} to stop and go")
        assert loop.time() - started < 5
    logs = {name: [e for _, e in cluster.api.log[cluster.api.kind_of("pods").key]
                   if e["object"]["metadata"]["name"] == seen[name]["metadata"]["name"]] for name in seen}
    states = {name: next(terminated(e["object"]) for e in events if e["object"]["status"].get("phase") == "Failed")
              for name, events in logs.items()}
    assert states["graceful"]["exitCode"] == 143 and states["graceful"]["message"].strip() == "got TERM"
    assert states["stubborn"]["exitCode"] == 137  # SIGKILL after the grace period


async def test_suspend_and_resume(cluster: Cluster, kubelet: Kubelet) -> None:
    await create(cluster, job("paused", "sleep 60", suspend=True, pod={"terminationGracePeriodSeconds": 1}))
    await eventually(lambda: condition(cluster.api.read("jobs", NS, "paused"), "Suspended"), 10, "Suspended")
    assert pods(cluster, "paused") == []
    await cluster.request("PATCH", f"/apis/batch/v1/namespaces/{NS}/jobs/paused", {"spec": {"suspend": False}},
                          "application/merge-patch+json")
    await eventually(lambda: [p for p in pods(cluster, "paused") if p["status"].get("phase") == "Running"], 10,
                     "a running pod")
    await cluster.request("PATCH", f"/apis/batch/v1/namespaces/{NS}/jobs/paused", {"spec": {"suspend": True}},
                          "application/merge-patch+json")
    await eventually(lambda: pods(cluster, "paused") == [], 10, "the pod to be stopped and removed")
    found = cluster.api.read("jobs", NS, "paused")
    assert condition(found, "Suspended") and found["status"]["active"] == 0 and found["status"]["failed"] == 0  # type: ignore[index]


async def test_scheduling_follows_affinity_taints_and_gpus(cluster: Cluster, kubelet: Kubelet) -> None:
    gpu_pod = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-A10G"]}]},
        {"matchExpressions": [{"key": "cloud.google.com/gke-accelerator", "operator": "In",
                               "values": ["nvidia-a10g"]}]}]}}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    limits = {"resources": {"limits": {"nvidia.com/gpu": "1"}}}
    await create(cluster, job("first", "sleep 30", pod=gpu_pod, container=limits))
    first = await eventually(lambda: pods(cluster, "first") and pods(cluster, "first")[0]["spec"].get("nodeName"),
                             10, "a node")
    assert first == "gpu-a10g-1"
    await create(cluster, job("second", "true", pod=gpu_pod, container=limits))
    message = await eventually(lambda: pods(cluster, "second") and next(
        (c["message"] for c in pods(cluster, "second")[0]["status"].get("conditions") or []
         if c["type"] == "PodScheduled" and c["status"] == "False"), None), 10, "Unschedulable")
    assert message.startswith("0/5 nodes are available:") and "1 Insufficient nvidia.com/gpu" in message
    await create(cluster, job("untolerant", "true", container=limits,
                              pod={"nodeSelector": {"kubernetes.io/hostname": "gpu-l4-1"}}))
    nodes = cluster.api.items("nodes")
    assert schedule(pods(cluster, "untolerant")[0], nodes, [])[0] is None
    assert "untolerated taint" in schedule({"spec": {}}, [n for n in nodes if n["metadata"]["name"] == "gpu-l4-1"],
                                           [])[1]


async def test_pod_port_is_reachable_on_127_0_0_1(cluster: Cluster, kubelet: Kubelet) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await create(cluster, job("web", f"python -m http.server {port} --bind 0.0.0.0", pod={
        "terminationGracePeriodSeconds": 1}))
    pod = await eventually(lambda: [p for p in pods(cluster, "web") if p["status"].get("phase") == "Running"], 10,
                           "running")

    async def answers() -> bool:
        try:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://{pod[0]['status']['podIP']}:{port}/") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False
    assert await eventually(answers, 20, "the pod's port")


async def test_pods_under_a_headless_service_find_each_other_by_name(cluster: Cluster, kubelet: Kubelet) -> None:
    """An Indexed Job whose pods have the Service as subdomain: `<job>-<i>.<service>.<ns>.svc` in argv and env is
    pod i's own IP; pod 1 connects to pod 0 by name (the way torchrun reaches its rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await cluster.api.put_object("services", {"apiVersion": "v1", "kind": "Service",
                                              "metadata": {"name": "mesh", "namespace": NS},
                                              "spec": {"clusterIP": "None", "selector": {"app": "mesh"}}})
    script = ("import os, socket, sys, time\n"
              "me, peer = sys.argv[1], sys.argv[2]\n"
              "if os.environ['JOB_COMPLETION_INDEX'] == '0':\n"
              "    srv = socket.create_server(('0.0.0.0', int(os.environ['PORT'])))\n"
              "    conn, _ = srv.accept(); got = conn.recv(200).decode()\n"
              "else:\n"
              "    for _ in range(200):\n"
              "        try:\n"
              "            conn = socket.create_connection((peer, int(os.environ['PORT'])), timeout=1); break\n"
              "        except OSError: time.sleep(0.1)\n"
              "    got = ''; conn.sendall(('hello from ' + me).encode())\n"
              "open(os.environ['MSG'], 'w').write(' '.join([me, peer, os.environ['SELF'], os.environ['POD_IP'],"
              " os.environ['OTHER'], os.environ['INDEX'], got]))\n")
    await create(cluster, job(
        "mesh", script, shell=False, completionMode="Indexed", completions=2, parallelism=2,
        container={"args": ["mesh-$(JOB_COMPLETION_INDEX).mesh.ml.svc", "mesh-0.mesh.ml.svc.cluster.local"],
                   "env": [{"name": "PORT", "value": str(port)}, {"name": "MSG", "value": "/dev/termination-log"},
                           {"name": "SELF", "value": "mesh-1.mesh.ml.svc:1234"},  # env values are resolved too
                           {"name": "OTHER", "value": "mesh-0.nosuch.ml.svc"},  # no such Service: unresolved
                           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                           {"name": "INDEX", "valueFrom": {"fieldRef": {
                               "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]},
        pod={"subdomain": "mesh"}))
    done = await finished(cluster, "mesh")
    assert condition(done, "Complete"), [kubelet.log(NS, p["metadata"]["name"]) for p in pods(cluster, "mesh")]
    by_index = {p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
                for p in pods(cluster, "mesh")}
    ips = {i: p["status"]["podIP"] for i, p in by_index.items()}
    assert ips["0"] != ips["1"] and all(ip.startswith("127.") for ip in ips.values())
    me0, peer0, self0, pod_ip0, other0, index0, *got = terminated(by_index["0"])["message"].split()
    me1, peer1, self1, pod_ip1, other1, index1 = terminated(by_index["1"])["message"].split()
    assert (me0, peer0, self0, pod_ip0, index0) == (ips["0"], ips["0"], f"{ips['1']}:1234", ips["0"], "0")
    assert (me1, peer1, self1, pod_ip1, index1) == (ips["1"], ips["0"], f"{ips['1']}:1234", ips["1"], "1")
    assert other0 == other1 == "mesh-0.nosuch.ml.svc"
    assert got == ["hello", "from", ips["1"]]


@pytest.mark.parametrize(("value", "expected"), [
    ("/etc/kubetune/job.json", "/h/config/job.json"), ("/etc/kubetune", "/h/config"),
    ("/etc/kubetunex", "/etc/kubetunex"),
    ("/tmp/hf", "/h/scratch/hf"), ("/tmp/cache/models", "/h/cache/models"), ("python", "python"),
])
def test_path_mapping(value: str, expected: str) -> None:
    from pathlib import Path

    mounts = {"/etc/kubetune": Path("/h/config"), "/tmp": Path("/h/scratch"), "/tmp/cache": Path("/h/cache")}
    assert map_path(value, mounts) == expected
