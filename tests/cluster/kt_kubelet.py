"""A test kubelet for the KubeEmulator (with its scheduler and Job controller): each pod runs as a local process.

Together they give the emulator what a cluster adds to an API server, so one test can follow a Job from
creation to the trainer's exit code. They act on the emulator in-process (`put_object`, `patch_object`,
`remove_object`), which produces the same watch events as API requests, and wake on the emulator's own
watch queues.

The Job controller is kt_jobs.py, the scheduler kt_scheduling.py; `Kubelet` runs all three.

Kubelet (one for every node): runs each container of a bound pod (containers run one after another,
the first that fails ends the pod; a trainer pod has one) as a process in its own session:
- argv = `command` + `args` (`$(VAR)` expanded from the container env); `python` and other names are
  looked up on the image PATH, which is this test interpreter's bin folder first (the "image" is this
  checkout, installed in the venv);
- env = the image env (PATH, LANG and what the test passes as `image_env`) + the container's `env`:
  `value`, `secretKeyRef` and `configMapKeyRef` (from objects in the emulator; a missing one that is
  not `optional` keeps the pod Pending with `CreateContainerConfigError`, as a kubelet does), `fieldRef`
  (metadata.name/namespace/uid, metadata.labels['k'], metadata.annotations['k'], status.podIP,
  spec.nodeName); `envFrom` likewise;
- volumes become host folders under the kubelet's root: `configMap` and `secret` as files (all keys, or
  `items`), `emptyDir` per pod, `persistentVolumeClaim` per claim (shared by every pod that mounts it and
  outliving them; the claim must exist), `subPath` honoured;
- PATHS. A process cannot see a mount at `/etc/kubetune`, so the kubelet maps container paths to those
  host folders: every argv item, env value the pod declares and `workingDir` that equals a `mountPath` or starts with
  `mountPath + "/"` is rewritten to the host folder (longest mount first). The `terminationMessagePath`
  is mapped the same way to a per-container host file. A volume mounted at `/tmp` also sets `TMPDIR`.
  Paths that reach the process any other way (inside a config file) are not rewritten;
- network: the pod shares the host network, so the port the process binds is reachable on every loopback
  address (two pods of one test must use different ports, as hostNetwork pods must). Each pod gets its own
  `podIP` in 127.0.0.0/8 (127.0.1.100, 127.0.1.101, ...: allocated in increasing order, the string order
  too, below 900 pods), which reaches the same host;
- DNS: a name `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]` in an argv item or env value (after
  `$(VAR)` expansion) is replaced by that pod's IP when a headless Service `<subdomain>` exists in the
  namespace and a pod there has that `hostname` and `subdomain` (the A record a cluster's DNS serves for an
  Indexed Job's pods); any other name is left as written (and resolves as the host resolves it, so not);
- status: `Pending` -> `Running` (containerStatuses `running`, `Ready`) -> `Succeeded`/`Failed` with the
  exit code (a signal N gives 128+N, a command that does not start gives 128 `StartError`), the reason
  (`Completed`, `Error`) and the termination message: the first 4096 bytes of the message file, or with
  `FallbackToLogsOnError` and a failure, the last 80 lines of the log (at most 2048 bytes). Logs are in
  `<root>/pods/<namespace>_<pod>/<container>.log`;
- deletion: the emulator (with `graceful_pods`) marks a running pod with `deletionTimestamp` and
  `deletionGracePeriodSeconds` (from the delete request or `terminationGracePeriodSeconds`, default 30);
  the kubelet sends SIGTERM to the process group, waits that long, sends SIGKILL, writes the final status
  and deletes the pod (finalizers still hold it until the Job controller has counted it).

Not emulated: probes (Ready follows Running), resource limits, securityContext (the processes run as this
user), image pulls, init containers, restartPolicy other than Never.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kt_emulator import KubeEmulator
from kt_jobs import TERMINAL, JobController, now
from kt_scheduling import sync_scheduler

MESSAGE_LIMIT = 4096
LOG_FALLBACK_LINES, LOG_FALLBACK_BYTES = 80, 2048


def map_path(value: str, mounts: Mapping[str, Path]) -> str:
    """A container path -> the host path of the mount that holds it (longest mount first); other values as is."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount:
            return str(mounts[mount])
        if value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + value[len(mount.rstrip("/")):]
    return value


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")
_SVC_NAME = re.compile(r"(?<![A-Za-z0-9.-])((?P<host>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.(?P<sub>[a-z0-9]([-a-z0-9]*"
                       r"[a-z0-9])?)\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.svc(\.cluster\.local)?)(?![A-Za-z0-9-])")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion (`$$` escapes; an unknown reference stays as written)."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, value)


# --- the running parts ----------------------------------------------------------------------------------

class ConfigError(Exception):
    """A reference the kubelet cannot resolve (missing Secret/ConfigMap/key/PVC): the pod waits."""


@dataclass
class RunningPod:
    uid: str
    namespace: str
    name: str
    folder: Path
    task: asyncio.Task[None] | None = None
    stopper: asyncio.Task[None] | None = None
    process: asyncio.subprocess.Process | None = None
    stopping: bool = False
    exit_codes: list[int] = field(default_factory=list)


class Kubelet:
    """Scheduler + Job controller + one kubelet for every node, for the emulator `api`."""

    def __init__(self, api: KubeEmulator, root: Path, *, image_env: Mapping[str, str] | None = None,
                 backoff_seconds: float = 0.0, tick: float = 0.2) -> None:
        self.api = api
        self.root = root
        self.image_env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin",
                                                   "/bin"]), "LANG": "C.UTF-8", **(image_env or {})}
        self.jobs = JobController(api, backoff_seconds)
        self.tick = tick
        self.pods: dict[str, RunningPod] = {}
        self.extra_env: list[tuple[Any, dict[str, str]]] = []  # (predicate(pod), env): fault injection
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.errors: list[BaseException] = []
        self.ips: dict[str, str] = {}  # pod uid -> its podIP

    # --- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> Kubelet:
        self.api.graceful_pods = True
        for plural in ("pods", "jobs", "nodes", "secrets", "configmaps", "persistentvolumeclaims"):
            self.api.watchers[self.api.kind_of(plural).key].add(self.queue)
        self.task = asyncio.create_task(self._run(), name="kt-kubelet")
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        for queues in self.api.watchers.values():
            queues.discard(self.queue)
        for running in list(self.pods.values()):
            if running.process is not None and running.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(running.process.pid, signal.SIGKILL)
                await running.process.wait()
            if running.task is not None:
                running.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await running.task
        self.api.graceful_pods = False

    async def __aenter__(self) -> Kubelet:
        return await self.start()

    async def __aexit__(self, *_: Any) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.queue.get(), self.tick)
                while not self.queue.empty():
                    self.queue.get_nowait()
            except TimeoutError:
                pass
            try:
                await self.sync()
            except Exception as exc:  # kept for the test to see; the loop goes on, as a controller's does
                self.errors.append(exc)
                if len(self.errors) > 100:
                    raise

    async def sync(self) -> None:
        await self.jobs.sync()
        await sync_scheduler(self.api)
        await self.sync_kubelet()

    # --- test helpers -----------------------------------------------------------------------------------

    def inject_env(self, predicate: Any, env: Mapping[str, str]) -> None:
        """Add `env` to the containers of pods for which `predicate(pod)` is true (faults the node injects)."""
        self.extra_env.append((predicate, dict(env)))

    def process_of(self, namespace: str, name: str) -> asyncio.subprocess.Process | None:
        for running in self.pods.values():
            if (running.namespace, running.name) == (namespace, name):
                return running.process
        return None

    def pod_ip(self, uid: str) -> str:
        """The pod's own loopback address (see the module docstring)."""
        if uid not in self.ips:
            n = len(self.ips)
            self.ips[uid] = f"127.0.{1 + n // 100}.{100 + n % 100}"
        return self.ips[uid]

    def resolve(self, value: str) -> str:
        """`value` with the cluster DNS names of pods under a headless Service replaced by their IPs."""
        def address(m: re.Match[str]) -> str:
            namespace, host, sub = m.group("ns"), m.group("host"), m.group("sub")
            service = self.api.read("services", namespace, sub)
            if service is None or (service.get("spec") or {}).get("clusterIP") != "None":
                return m.group(0)
            pods = [p for p in self.api.items("pods", namespace) if (p.get("spec") or {}).get("hostname") == host
                    and (p.get("spec") or {}).get("subdomain") == sub
                    and (p.get("status") or {}).get("phase") not in TERMINAL]
            pods.sort(key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["resourceVersion"])
            return self.pod_ip(pods[-1]["metadata"]["uid"]) if pods else m.group(0)
        return _SVC_NAME.sub(address, value) if ".svc" in value else value

    def log(self, namespace: str, name: str, container: str | None = None) -> str:
        folder = self.root / "pods" / f"{namespace}_{name}"
        files = sorted(folder.glob(f"{container or '*'}.log"))
        return "".join(f.read_text(errors="replace") for f in files)

    async def evict(self, namespace: str, name: str) -> None:
        """What the Eviction API does: the DisruptionTarget condition, then a graceful delete."""
        pod = self.api.read("pods", namespace, name)
        if pod is None:
            return
        conditions = [c for c in (pod.get("status") or {}).get("conditions") or []
                      if c.get("type") != "DisruptionTarget"]
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                           "message": "Eviction API: evicting", "lastTransitionTime": now()})
        await self.api.patch_object("pods", namespace, name, {"status": {"conditions": conditions}})
        await self.api.remove_object("pods", namespace, name)

    # --- the kubelet ------------------------------------------------------------------------------------

    async def sync_kubelet(self) -> None:
        for pod in self.api.items("pods"):
            meta, spec = pod["metadata"], pod.get("spec") or {}
            phase = (pod.get("status") or {}).get("phase")
            if not spec.get("nodeName"):
                continue
            running = self.pods.get(meta["uid"])
            if meta.get("deletionTimestamp"):
                if running is not None and running.task is not None and not running.stopping:
                    running.stopping = True
                    running.stopper = asyncio.create_task(
                        self._terminate(running, int(meta.get("deletionGracePeriodSeconds", 30))))
                elif running is None and phase not in TERMINAL:  # never started: nothing to stop
                    await self._finish(pod, "Failed", [], reason="Terminated")
                elif running is None or running.task is None or running.task.done():
                    await self.api.remove_object("pods", meta["namespace"], meta["name"])
                continue
            if running is None and phase not in TERMINAL:
                await self._start(pod)

    async def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        folder = self.root / "pods" / f"{meta['namespace']}_{meta['name']}"
        try:
            prepared = [self._prepare(pod, c, folder) for c in (pod.get("spec") or {}).get("containers") or []]
        except ConfigError as exc:
            await self._waiting(pod, "CreateContainerConfigError", str(exc))
            return
        running = RunningPod(meta["uid"], meta["namespace"], meta["name"], folder)
        self.pods[meta["uid"]] = running
        running.task = asyncio.create_task(self._run_pod(pod, running, prepared), name=f"pod {meta['name']}")

    async def _waiting(self, pod: Mapping[str, Any], reason: str, message: str) -> None:
        meta = pod["metadata"]
        statuses = [{"name": c["name"], "ready": False, "restartCount": 0,
                     "state": {"waiting": {"reason": reason, "message": message}}}
                    for c in (pod.get("spec") or {}).get("containers") or []]
        if (pod.get("status") or {}).get("containerStatuses") != statuses:
            await self.api.patch_object("pods", meta["namespace"], meta["name"],
                                        {"status": {"phase": "Pending", "containerStatuses": statuses}})

    def _prepare(self, pod: Mapping[str, Any], container: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """argv, env, cwd and the message file of one container, with volumes made and paths mapped."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise ConfigError(f"volumeMount {mount['name']!r}: no volume of that name in the pod")
            host = self._volume(pod, volume, folder)
            if mount.get("subPath"):
                host = host / mount["subPath"]
                host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"]] = host
        name = container["name"]
        message_file = folder / "termination" / name
        message_file.parent.mkdir(parents=True, exist_ok=True)
        message_file.write_text("")
        message_path = container.get("terminationMessagePath", "/dev/termination-log")
        paths = {**mounts, message_path: message_file}
        env: dict[str, str] = dict(self.image_env)  # host paths (PATH): never rewritten, wherever the checkout is
        if "/tmp" in mounts:
            env["TMPDIR"] = str(mounts["/tmp"])
        declared: dict[str, str] = {}  # what the pod spec sets: container paths, rewritten to the mounts
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if ref := source.get("configMapRef"):
                data = self._object_data("configmaps", meta["namespace"], ref, None)
            else:
                data = self._object_data("secrets", meta["namespace"], source.get("secretRef") or {}, None)
            declared.update({prefix + k: v for k, v in (data or {}).items()})
        for item in container.get("env") or []:
            value = self._env_value(pod, item, {**env, **declared})
            if value is not None:
                declared[item["name"]] = value
        env.update({k: self.resolve(map_path(v, paths)) for k, v in declared.items()})
        for predicate, extra in self.extra_env:
            if predicate(pod):
                env.update(extra)
        argv = [self.resolve(map_path(expand(a, env), paths)) for a in [*(container.get("command") or []),
                                                                          *(container.get("args") or [])]]
        if not argv:
            raise ConfigError(f"container {name}: no command (image entrypoints are not emulated)")
        cwd = map_path(container["workingDir"], paths) if container.get("workingDir") else str(folder)
        return {"name": name, "argv": argv, "env": env, "cwd": cwd, "message_file": message_file,
                "policy": container.get("terminationMessagePolicy", "File"), "log": folder / f"{name}.log"}

    def _volume(self, pod: Mapping[str, Any], volume: Mapping[str, Any], folder: Path) -> Path:
        namespace = pod["metadata"]["namespace"]
        if "emptyDir" in volume:
            path = folder / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            return path
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if self.api.read("persistentvolumeclaims", namespace, claim) is None:
                raise ConfigError(f'persistentvolumeclaim "{claim}" not found')
            path = self.root / "pvcs" / f"{namespace}_{claim}"
            path.mkdir(parents=True, exist_ok=True)
            return path
        for plural, key, ref_key in (("configmaps", "configMap", "name"), ("secrets", "secret", "secretName")):
            if key in volume:
                source = volume[key]
                data = self._object_data(plural, namespace, {"name": source.get(ref_key),
                                                             "optional": source.get("optional", False)}, None)
                path = folder / "volumes" / volume["name"]
                if path.exists():
                    shutil.rmtree(path)
                path.mkdir(parents=True)
                items = source.get("items") or [{"key": k, "path": k} for k in sorted(data or {})]
                for item in items:
                    if item["key"] not in (data or {}):
                        raise ConfigError(f'{key} "{source.get(ref_key)}": no key {item["key"]!r}')
                    target = path / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text((data or {})[item["key"]])
                return path
        raise ConfigError(f"volume {volume['name']!r}: only emptyDir, persistentVolumeClaim, configMap and secret "
                          "volumes are emulated")

    def _object_data(self, plural: str, namespace: str, ref: Mapping[str, Any], key: str | None) -> Any:
        obj = self.api.read(plural, namespace, ref.get("name", ""))
        singular = plural.rstrip("s")
        if obj is None:
            if ref.get("optional"):
                return None
            raise ConfigError(f'{singular} "{ref.get("name")}" not found')
        data = dict(obj.get("data") or {})
        if plural == "secrets":
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        if key is None:
            return data
        if key not in data:
            if ref.get("optional"):
                return None
            raise ConfigError(f"couldn't find key {key} in {singular.capitalize()} {namespace}/{ref.get('name')}")
        return data[key]

    def _env_value(self, pod: Mapping[str, Any], item: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
        if "value" in item:
            return expand(str(item["value"]), env)
        source = item.get("valueFrom") or {}
        namespace = pod["metadata"]["namespace"]
        if ref := source.get("secretKeyRef"):
            return self._object_data("secrets", namespace, ref, ref["key"])  # type: ignore[no-any-return]
        if ref := source.get("configMapKeyRef"):
            return self._object_data("configmaps", namespace, ref, ref["key"])  # type: ignore[no-any-return]
        if ref := source.get("fieldRef"):
            fields = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": namespace,
                      "metadata.uid": pod["metadata"]["uid"], "status.podIP": self.pod_ip(pod["metadata"]["uid"]),
                      "spec.nodeName": (pod.get("spec") or {}).get("nodeName", "")}
            meta = pod["metadata"]
            if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", ref["fieldPath"]):
                return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
            if ref["fieldPath"] not in fields:
                raise ConfigError(f"fieldRef {ref['fieldPath']}: allowed {', '.join(sorted(fields))}")
            return fields[ref["fieldPath"]]
        return "" if not source else None

    async def _run_pod(self, pod: dict[str, Any], running: RunningPod, prepared: list[dict[str, Any]]) -> None:
        meta = pod["metadata"]
        started = now()
        await self.api.patch_object("pods", meta["namespace"], meta["name"], {"status": {
            "phase": "Running", "podIP": self.pod_ip(meta["uid"]), "podIPs": [{"ip": self.pod_ip(meta["uid"])}],
            "hostIP": "127.0.0.1",
            "startTime": started,
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": started}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": c["name"], "ready": True, "restartCount": 0, "started": True,
                                   "state": {"running": {"startedAt": started}}} for c in prepared],
        }})
        statuses: list[dict[str, Any]] = []
        ok = True
        for container in prepared:
            if not ok or running.stopping:
                break
            terminated = await self._run_container(container, running)
            statuses.append({"name": container["name"], "ready": False, "restartCount": 0, "started": False,
                             "state": {"terminated": terminated}})
            ok = terminated["exitCode"] == 0
        await self._finish(pod, "Succeeded" if ok and not running.stopping and len(statuses) == len(prepared)
                           else "Failed", statuses)

    async def _run_container(self, container: Mapping[str, Any], running: RunningPod) -> dict[str, Any]:
        started = now()
        with open(container["log"], "ab") as log:
            try:
                process = await asyncio.create_subprocess_exec(
                    *container["argv"], env=container["env"], cwd=container["cwd"], stdin=asyncio.subprocess.DEVNULL,
                    stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                return {"exitCode": 128, "reason": "StartError", "startedAt": started, "finishedAt": now(),
                        "message": f"failed to start {container['argv'][0]!r}: {exc.strerror}"}
            running.process = process
            code = await process.wait()
        exit_code = 128 - code if code < 0 else code
        message = container["message_file"].read_bytes()[:MESSAGE_LIMIT].decode(errors="replace")
        if not message.strip() and exit_code != 0 and container["policy"] == "FallbackToLogsOnError":
            lines = container["log"].read_bytes().decode(errors="replace").splitlines()[-LOG_FALLBACK_LINES:]
            message = "\n".join(lines)[-LOG_FALLBACK_BYTES:]
        running.exit_codes.append(exit_code)
        return {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message,
                "startedAt": started, "finishedAt": now()}

    async def _terminate(self, running: RunningPod, grace: int) -> None:
        """SIGTERM, the grace period, SIGKILL (to the whole process group)."""
        process = running.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        if running.task is not None:
            with contextlib.suppress(Exception):
                await running.task
        with contextlib.suppress(Exception):
            await self.api.remove_object("pods", running.namespace, running.name)

    async def _finish(self, pod: Mapping[str, Any], phase: str, statuses: list[dict[str, Any]],
                      reason: str | None = None) -> None:
        meta = pod["metadata"]
        current = self.api.read("pods", meta["namespace"], meta["name"])
        if current is None:
            return
        conditions = [c for c in (current.get("status") or {}).get("conditions") or []
                      if c.get("type") not in ("Ready", "ContainersReady")]
        conditions += [{"type": t, "status": "False", "reason": "PodCompleted" if phase == "Succeeded" else "PodFailed",
                        "lastTransitionTime": now()} for t in ("ContainersReady", "Ready")]
        status: dict[str, Any] = {"phase": phase, "conditions": conditions}
        if statuses:
            status["containerStatuses"] = statuses
        if reason:
            status["reason"] = reason
        await self.api.patch_object("pods", meta["namespace"], meta["name"], {"status": status})
