"""Operator scale: N FineTuneJobs created at once against the Kubernetes emulator (not a test).

    .venv/bin/python bench/operator_scale.py --jobs 500 --compare 50

The emulator (kmock's, extended in tests/operator/kt_emulator.py) serves HTTP on 127.0.0.1 in this
process; the operator is the real `kubetune operator` command in a child process, logged in through a
kubeconfig that points at the emulator. Reported:

- create -> Job latency per FineTuneJob (p50, p99, max): from the FineTuneJob's creation to its trainer
  Job's creation, both timestamped by the emulator;
- create -> status latency (the FineTuneJob's status says Queued);
- API requests per job: every request the operator made from the first create until all statuses
  settled, over N (the benchmark's own POSTs not counted), with the breakdown by verb and resource;
- operator memory: the child's peak and final RSS (VmHWM, VmRSS), next to its RSS before the burst;
- side by side with a small burst (--compare): per-job requests, CPU and p99, and their ratios;
- with --baseline REV, the same bursts against the operator of an older commit (a temporary git worktree of
  REV, put first on the child's PYTHONPATH), and the two side by side.

    .venv/bin/python bench/operator_scale.py --jobs 500 --compare 50 --baseline 62803f5

With --pin, the operator runs alone on one CPU and the emulator with this benchmark on the others, as on a
cluster, where the API server does not share the operator's CPU: the latencies are then the operator's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kmock
import yaml

from kubetune import wire
from kubetune.spec import API_GROUP, API_VERSION, PLURAL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "operator"))
sys.path.insert(0, str(ROOT / "bench"))
from kt_cluster import CLUSTER, node  # noqa: E402
from kt_emulator import KubeEmulator  # noqa: E402
from operator_fixtures import QUEUED_EVERY, populate  # noqa: E402

NS = "bench"
PROFILE = os.environ.get("KUBETUNE_BENCH_PROFILE", "")  # a path: cProfile each operator into PATH.<pid>.1, .2
PROFILED: list[str] = []  # the profiles written, one per operator process started (PATH.<bench pid>.N)
OPERATOR_CPUS: set[int] = set()  # --pin: the CPUs the operator may run on (empty: any)


def ftj(index: int) -> dict[str, Any]:
    models = ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-v0.3",
              "meta-llama/Llama-3.1-70B-Instruct"]
    return {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": f"ftj-{index:04d}", "namespace": NS},
        "spec": {
            "model": {"name": models[index % len(models)]},
            "dataset": {"source": f"s3://datasets/bench/{index}.jsonl"},
            "training": {"maxSteps": 100},
            "output": {"uri": f"s3://adapters/bench/{index}/", "credentialsSecret": "s3-creds"},
        },
    }


HISTORY_FROM = 100_000  # --history's FineTuneJobs are ftj-100000...: no burst job has their names


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Operator:
    """The real `kubetune operator` command in a child process, logged in to the emulator by a kubeconfig."""

    def __init__(self, url: str, tmp: Path, source: Path | None, quota: bool = False) -> None:
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": url}}],
            "users": [{"name": "bench", "user": {"token": "bench"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "bench"}}],
        }))
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_POLL_INTERVAL": "10"}
        if quota:  # every namespace under a default quota that refuses nothing: each decision counts usage
            (tmp / "quotas.yaml").write_text(yaml.safe_dump({"default": {"maxConcurrentJobs": 1_000_000}}))
            self.env["KUBETUNE_QUOTAS"] = str(tmp / "quotas.yaml")
        if source is not None:  # the older checkout's packages shadow the installed (editable) ones
            paths = [str(source), str(source / "operator"), str(source / "trainer")]
            self.env["PYTHONPATH"] = os.pathsep.join([*paths, self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.log = tmp / "operator.log"
        self.cwd = source  # `python -c` puts the working directory first on sys.path: the checkout's own kubetune
        self.cpu_before_restarts = 0.0
        self.child = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        code = "import sys; from kubetune.cli import main; sys.exit(main())"
        if PROFILE:  # cProfile over the whole process, written when the operator stops (SIGTERM)
            PROFILED.append(f"{PROFILE}.{os.getpid()}.{len(PROFILED) + 1}")
            code = f"import cProfile, sys; from kubetune.cli import main; cProfile.run('main()', {PROFILED[-1]!r})"
        pinned = ["taskset", "-c", ",".join(map(str, sorted(OPERATOR_CPUS)))] if OPERATOR_CPUS else []
        return subprocess.Popen(  # taskset execs the operator: the same pid, all its threads on those CPUs
            [*pinned, sys.executable, "-c", code, "operator", "--metrics-port", "0"],
            env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=open(self.log, "a"),
        )

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu(self) -> float:
        """CPU seconds of this operator and of those it replaced (SIGKILLed)."""
        return self.cpu_before_restarts + cpu_seconds(self.child.pid)

    def kill_and_restart(self) -> None:
        self.cpu_before_restarts += cpu_seconds(self.child.pid)
        self.child.send_signal(signal.SIGKILL)
        self.child.wait()
        self.child = self._start()

    def stop(self) -> None:
        self.child.terminate()
        try:
            self.child.wait(15)
        except subprocess.TimeoutExpired:
            self.child.kill()


async def watching(api: KubeEmulator, op: Operator, requests_before: int = 0) -> None:
    """Until the operator watches FineTuneJobs (its first LIST or watch request arrived)."""
    deadline = time.perf_counter() + 60
    while api.request_count("GET", "finetunejobs") <= requests_before:
        if op.child.poll() is not None or time.perf_counter() > deadline:
            print(op.log.read_text()[-3000:], file=sys.stderr)
            raise SystemExit("the operator did not start")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def emulator(nodes: list[dict[str, Any]]) -> AsyncIterator[tuple[KubeEmulator, str]]:
    async with KubeEmulator() as api, kmock.Server(api) as server:
        for item in nodes:
            await api.put_object("nodes", item)
        yield api, str(server.url).rstrip("/")


def cluster_nodes() -> list[dict[str, Any]]:
    return [node(name, labels, gpus) for name, labels, gpus in CLUSTER]


async def run_one(jobs: int, timeout: float, source: Path | None = None, kill_at: int | None = None,
                  history: int = 0, quota: bool = False) -> dict[str, Any]:
    """A fresh emulator and operator process (from `source`, a checkout, when given); one burst of `jobs`;
    with `kill_at`, the operator is SIGKILLed once that many trainer Jobs exist, and started again. With
    `history`, that many FineTuneJobs (as --resident makes them) are in the cluster before the operator starts;
    with `quota`, the operator runs under a default quota that refuses nothing."""
    async with emulator(cluster_nodes()) as (api, url):
        await populate(api, [ftj(HISTORY_FROM + i) for i in range(history)], cluster_nodes())
        with tempfile.TemporaryDirectory() as tmp:
            op = Operator(url, Path(tmp), source, quota)
            try:
                if history:
                    await watching(api, op)
                    await quiet(op)  # the relist is over before the burst
                result = await _measure(api, url, op, jobs, timeout, kill_at)
                if kill_at is not None:
                    result["faults"] = audit(api, jobs)
                return result
            finally:
                op.stop()


async def _measure(api: KubeEmulator, url: str, op: Operator, jobs: int, timeout: float,
                   kill_at: int | None = None) -> dict[str, Any]:
    await watching(api, op)
    await asyncio.sleep(2.0)  # settled
    idle_rss = memory_kib(op.pid)
    before = dict(api.counts)
    operator_cpu, bench_cpu = op.cpu(), time.process_time()

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as session:
        async def create(body: dict[str, Any]) -> None:
            path = url + wire.collection_path(f"{API_GROUP}/{API_VERSION}", PLURAL, NS)
            async with session.post(path, json=body) as response:
                assert response.status == 201, await response.text()

        creates = asyncio.gather(*(create(ftj(i)) for i in range(jobs)))
        killed = await kill_when(api, op, kill_at) if kill_at is not None else None
        await creates
    posted = time.perf_counter() - started

    ftj_key = api.kind_of("finetunejobs").key
    awaited = [((ftj_key, NS, f"ftj-{i:04d}"), "Queued") for i in range(jobs)]

    def queued() -> int:  # polled every 0.1 s in the emulator's process: keys made once
        return sum(key in api.phase_at for key in awaited)

    deadline = started + timeout
    while queued() < jobs and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let trailing Events land before counting requests
    peak_rss = memory_kib(op.pid)
    operator_cpu, bench_cpu = op.cpu() - operator_cpu, time.process_time() - bench_cpu

    job_key = api.kind_of("jobs").key
    latencies, status_latencies = [], []
    for i in range(jobs):
        name = f"ftj-{i:04d}"
        created = api.created_at.get((ftj_key, NS, name))
        job_created = api.created_at.get((job_key, NS, f"{name}-a1"))
        if created is not None and job_created is not None:
            latencies.append(job_created - created)
        status_at = api.phase_at.get(((ftj_key, NS, name), "Queued"))
        if created is not None and status_at is not None:
            status_latencies.append(status_at - created)

    delta = {k: v - before.get(k, 0) for k, v in api.counts.items() if v - before.get(k, 0)}
    delta[("POST", "finetunejobs")] = delta.get(("POST", "finetunejobs"), 0) - jobs  # the benchmark's own
    return {
        "jobs": jobs, "posted": posted, "made": len(latencies), "queued": queued(),
        "latencies": latencies, "status_latencies": status_latencies,
        "requests": {k: v for k, v in delta.items() if v}, "idle_rss": idle_rss, "peak_rss": peak_rss,
        "operator_cpu": operator_cpu, "bench_cpu": bench_cpu, "killed": killed,
    }


async def kill_when(api: KubeEmulator, op: Operator, kill_at: int) -> dict[str, Any]:
    """SIGKILL the operator once `kill_at` trainer Jobs exist, start it again; when and how far it had got."""
    while api.request_count("POST", "jobs") < kill_at:
        await asyncio.sleep(0.005)
    jobs_then = sum(1 for key in api.store if key[0] == api.kind_of("jobs").key)
    op.kill_and_restart()
    return {"at": time.perf_counter(), "jobs": jobs_then}


def audit(api: KubeEmulator, jobs: int) -> dict[str, Any]:
    """After a kill mid-burst: each FineTuneJob's trainer Jobs, status and Events (the emulator's store)."""
    children: dict[str, int] = {}
    for job in api.items("jobs", NS):
        owner = job["metadata"]["labels"].get(wire.JOB_LABEL, "")
        children[owner] = children.get(owner, 0) + 1
    events: dict[tuple[str, str], int] = {}
    for plural, group in (("events", None), ("events", "events.k8s.io")):
        for event in api.items(plural, NS, group=group):
            ref = event.get("involvedObject") or event.get("regarding") or {}
            key = (ref.get("name", ""), event.get("reason", ""))
            events[key] = events.get(key, 0) + 1
    bad_status: list[str] = []
    no_event: list[str] = []
    extra_event: list[str] = []
    for i in range(jobs):
        name = f"ftj-{i:04d}"
        status = (api.read("finetunejobs", NS, name) or {}).get("status") or {}
        if status.get("phase") != "Queued" or status.get("jobName") != f"{name}-a1" or \
                len(status.get("attempts") or []) != 1:
            bad_status.append(name)
        sent = events.get((name, "JobCreated"), 0)
        (no_event if sent == 0 else extra_event if sent > 1 else []).append(name)
    return {"duplicate_jobs": sorted(k for k, v in children.items() if v > 1),
            "missing_jobs": [f"ftj-{i:04d}" for i in range(jobs) if f"ftj-{i:04d}" not in children],
            "bad_status": bad_status, "no_event": no_event, "repeated_event": extra_event}


def report(r: dict[str, Any]) -> None:
    jobs, latencies, status_latencies = r["jobs"], r["latencies"], r["status_latencies"]
    total = sum(r["requests"].values())
    print(f"Operator scale: {jobs} FineTuneJobs created at once (the POSTs took {r['posted']:.2f} s)")
    print(f"  trainer Jobs created: {r['made']}/{jobs}; statuses Queued: {r['queued']}/{jobs}")
    if latencies:
        print(f"  create -> Job     p50 {statistics.median(latencies):.3f} s   p99 {percentile(latencies, 0.99):.3f} s"
              f"   max {max(latencies):.3f} s")
    if status_latencies:
        print(f"  create -> status  p50 {statistics.median(status_latencies):.3f} s   "
              f"p99 {percentile(status_latencies, 0.99):.3f} s   max {max(status_latencies):.3f} s")
    print(f"  API requests by the operator: {total} = {total / jobs:.2f} per job")
    for (method, plural), count in sorted(r["requests"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"    {method:6} {plural:14} {count:6}  ({count / jobs:.2f} per job)")
    print(f"  operator RSS: idle {r['idle_rss']['VmRSS'] / 1024:.0f} MiB, after the burst "
          f"{r['peak_rss']['VmRSS'] / 1024:.0f} MiB, peak {r['peak_rss']['VmHWM'] / 1024:.0f} MiB")
    print(f"  CPU during the burst: operator {r['operator_cpu']:.2f} s ({r['operator_cpu'] / jobs * 1000:.1f} ms per "
          f"job), emulator + benchmark {r['bench_cpu']:.2f} s (this machine: {os.cpu_count()} cores)")


def compare(small: dict[str, Any], large: dict[str, Any]) -> None:
    """Side by side: does the cost per job stay flat from the small burst to the large one?"""
    def per_job(r: dict[str, Any]) -> tuple[float, float, float]:
        return (sum(r["requests"].values()) / r["jobs"], r["operator_cpu"] / r["jobs"] * 1000,
                percentile(r["latencies"], 0.99))

    (rq_s, cpu_s, p99_s), (rq_l, cpu_l, p99_l) = per_job(small), per_job(large)
    a, b = small["jobs"], large["jobs"]
    print(f"Side by side, {a} vs {b} jobs ({b / a:.0f}x the burst):")
    print(f"  API requests per job  {rq_s:6.2f} vs {rq_l:6.2f}   ratio {rq_l / rq_s:.2f}")
    print(f"  operator CPU per job  {cpu_s:6.1f} vs {cpu_l:6.1f} ms  ratio {cpu_l / cpu_s:.2f}")
    print(f"  create -> Job p99     {p99_s:6.3f} vs {p99_l:6.3f} s   ratio {p99_l / p99_s:.2f}")


def worktree(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return into


def side_by_side(rev: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    def row(r: dict[str, Any]) -> tuple[float, float, float, float]:
        return (percentile(r["latencies"], 0.99), statistics.median(r["latencies"]),
                sum(r["requests"].values()) / r["jobs"], r["operator_cpu"] / r["jobs"] * 1000)

    (p99_o, p50_o, rq_o, cpu_o), (p99_n, p50_n, rq_n, cpu_n) = row(old), row(new)
    print(f"Side by side, {new['jobs']} jobs: {rev} (before) vs this checkout (after)")
    print(f"  create -> Job p99     {p99_o:6.3f} vs {p99_n:6.3f} s   ratio {p99_n / p99_o:.2f}")
    print(f"  create -> Job p50     {p50_o:6.3f} vs {p50_n:6.3f} s   ratio {p50_n / p50_o:.2f}")
    print(f"  API requests per job  {rq_o:6.2f} vs {rq_n:6.2f}     ratio {rq_n / rq_o:.2f}")
    print(f"  operator CPU per job  {cpu_o:6.1f} vs {cpu_n:6.1f} ms  ratio {cpu_n / cpu_o:.2f}")


T = TypeVar("T")


def _in_this_process(cpus: set[int], mode: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...]) -> T:
    OPERATOR_CPUS.update(cpus)
    return asyncio.run(mode(*args))


async def isolated(mode: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """One mode (its emulator, client and operator) in a fresh interpreter. In one process, the next mode ran
    slower: a stopped kmock emulator stays reachable (its cancelled stream task's CancelledError keeps the frames
    that hold it), so after a 10,000-job resident run the burst's emulator walked 1.48 million leftover objects in
    every collection (4.7 s of its 7.7 s of CPU, against 1.9 of 5.3 s fresh), and even with those frozen out of
    the collector it stayed slower (6.1-8.6 s against 4.4-5.7 s), which slowed the operator's burst with it."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, _in_this_process, set(OPERATOR_CPUS), mode,
                                                                args)


async def suite(args: argparse.Namespace, source: Path | None) -> dict[str, Any]:
    """Every mode asked for, against one operator (this checkout, or `source`)."""
    out: dict[str, Any] = {}
    if args.resident:
        out["resident"] = []
        for size in [0, *args.resident]:
            out["resident"].append(await isolated(run_resident, size, args.idle, source, args.relist_limit))
            report_resident(out["resident"][-1], out["resident"][0]["rss"]["VmRSS"] if size else None)
    if args.jobs:
        out["bursts"] = []
        for jobs in ([args.compare] if args.compare else []) + [args.jobs]:
            out["bursts"].append(await isolated(run_one, jobs, args.timeout, source, None, args.history, args.quota))
            report(out["bursts"][-1])
        if len(out["bursts"]) > 1:
            compare(out["bursts"][0], out["bursts"][-1])
    if args.kill:
        out["kill"] = await isolated(run_one, args.kill, args.timeout, source, args.kill // 2)
        report(out["kill"])
        report_faults(out["kill"])
    return out


def report_faults(r: dict[str, Any]) -> None:
    faults, killed = r["faults"], r["killed"]
    print(f"  SIGKILL with {killed['jobs']} of {r['jobs']} trainer Jobs created, then started again:")
    for key, text in (("duplicate_jobs", "FineTuneJobs with more than one Job"),
                      ("missing_jobs", "FineTuneJobs with no Job"),
                      ("bad_status", "statuses not Queued with attempt 1"),
                      ("no_event", "FineTuneJobs with no JobCreated Event"),
                      ("repeated_event", "FineTuneJobs with the JobCreated Event twice or more")):
        print(f"    {text}: {len(faults[key])} {faults[key][:5] if faults[key] else ''}")


def side_by_side_all(rev: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    print(f"=== side by side: {rev} (before) vs this checkout (after) ===")
    for a, b in zip(old.get("resident", []), new.get("resident", []), strict=True):
        print(f"  {a['resident']:6} resident: RSS {a['rss']['VmRSS'] / 1024:5.0f} vs "
              f"{b['rss']['VmRSS'] / 1024:5.0f} MiB"
              f"   idle CPU {100 * a['idle_cpu_share']:5.1f}% vs {100 * b['idle_cpu_share']:5.1f}%"
              f"   relist {a['relist_s']:5.1f} vs {b['relist_s']:5.1f} s, writes "
              f"{sum(a['relist_writes'].values())} vs {sum(b['relist_writes'].values())}")
    if "bursts" in old:
        side_by_side(rev, old["bursts"][-1], new["bursts"][-1])
    if "kill" in old:
        fo, fn = old["kill"]["faults"], new["kill"]["faults"]
        for key in fo:
            print(f"  kill mid-burst, {key}: {len(fo[key])} vs {len(fn[key])}")


def pin() -> str:
    """The operator on the first CPU this process may use, the emulator and the benchmark on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs 2 CPUs or more; this process may use {len(cpus)}")
    OPERATOR_CPUS.add(cpus[0])
    os.sched_setaffinity(0, cpus[1:])
    return f"operator on CPU {cpus[0]}, emulator + benchmark on CPU {','.join(map(str, cpus[1:]))}"


async def main(args: argparse.Namespace) -> int:
    if args.pin:
        print(f"pinned: {pin()}")
    before: dict[str, Any] | None = None
    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            source = worktree(args.baseline, Path(tmp) / "baseline")
            try:
                print(f"=== before: {args.baseline} ===")
                before = await suite(args, source)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)], check=False)
        print("=== after: this checkout ===")
    after = await suite(args, None)
    if before is not None:
        side_by_side_all(args.baseline, before, after)
    runs = [*after.get("bursts", []), *([after["kill"]] if "kill" in after else [])]
    return 0 if all(r["made"] == r["jobs"] for r in runs) else 1


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]



WRITES = ("POST", "PUT", "PATCH", "DELETE")


async def quiet(op: Operator, share: float = 0.03, polls: int = 3, limit: float = 300.0, busy: bool = False
                ) -> float:
    """Wait until the operator has been busy (its relist; `busy=True`: no need, it has nothing to list) and then
    kept its CPU under `share` of one core for `polls` one-second polls in a row; returns perf_counter() at the
    start of that quiet stretch. On a loaded machine a working operator still gets several percent of a core,
    so a low `share` does not mistake starvation for quiet."""
    deadline, calm, since = time.perf_counter() + limit, 0, time.perf_counter()
    last = op.cpu()
    while (calm < polls or not busy) and time.perf_counter() < deadline:
        await asyncio.sleep(1.0)
        now = op.cpu()
        if now - last < share:
            calm += 1
        else:
            calm, busy, since = 0, True, time.perf_counter()
        last = now
    return since


async def run_resident(resident: int, idle: float, source: Path | None = None, limit: float = 300.0
                       ) -> dict[str, Any]:
    """`resident` FineTuneJobs (with ConfigMap, Job, pod) already in the cluster when the operator starts: its
    relist (time, writes), then its RSS and its CPU over `idle` seconds with nothing happening."""
    async with emulator(cluster_nodes()) as (api, url):
        await populate(api, [ftj(i) for i in range(resident)], cluster_nodes())
        with tempfile.TemporaryDirectory() as tmp:
            before = {k: v for k, v in api.counts.items() if k[0] in WRITES}
            op = Operator(url, Path(tmp), source)
            try:
                await watching(api, op)
                listed = time.perf_counter()
                settled = await quiet(op, limit=limit, busy=not resident)
                writes = {k: v - before.get(k, 0) for k, v in api.counts.items()
                          if k[0] in WRITES and v - before.get(k, 0)}
                rss = memory_kib(op.pid)
                cpu, wall = op.cpu(), time.perf_counter()
                await asyncio.sleep(idle)
                cpu, wall = op.cpu() - cpu, time.perf_counter() - wall
                later = {k: v - before.get(k, 0) - writes.get(k, 0) for k, v in api.counts.items()
                         if k[0] in WRITES and v - before.get(k, 0) - writes.get(k, 0)}
                return {"resident": resident, "relist_s": settled - listed, "relist_writes": writes,
                        "rss": rss, "rss_after_idle": memory_kib(op.pid), "idle_cpu_share": cpu / wall,
                        "idle_s": wall, "idle_writes": later}
            finally:
                op.stop()


def report_resident(r: dict[str, Any], empty_kib: int | None) -> None:
    writes = sum(r["relist_writes"].values())
    rss = r["rss"]["VmRSS"]
    per_job = f", {(rss - empty_kib) * 1024 / r['resident'] / 1024:.1f} KiB per job over the empty operator" \
        if empty_kib is not None and r["resident"] else ""
    print(f"Resident: {r['resident']} FineTuneJobs ({r['resident'] // QUEUED_EVERY} Queued, the rest Succeeded), "
          f"each with its ConfigMap, Job and pod")
    print(f"  relist at start: {r['relist_s']:.1f} s until the operator's CPU went quiet (or the limit); "
          f"writes: {writes} "
          f"{dict(sorted(r['relist_writes'].items())) or ''}")
    print(f"  operator RSS {rss / 1024:.0f} MiB (peak {r['rss']['VmHWM'] / 1024:.0f} MiB){per_job}; "
          f"{r['rss_after_idle']['VmRSS'] / 1024:.0f} MiB after the idle stretch")
    print(f"  idle: operator CPU {100 * r['idle_cpu_share']:.1f}% of one core over {r['idle_s']:.0f} s; writes "
          f"{sum(r['idle_writes'].values())} {dict(sorted(r['idle_writes'].items())) or ''}")

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="FineTuneJobs in the measured burst (0: no burst)")
    parser.add_argument("--compare", type=int, default=50,
                        help="also run a burst this size first and print the per-job ratios (0: off)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all Jobs")
    parser.add_argument("--baseline", help="a git revision whose operator runs the same modes first")
    parser.add_argument("--resident", type=sizes, default=[],
                        help="comma-separated counts of FineTuneJobs already in the cluster (e.g. 2000,5000,10000): "
                             "relist time and writes, RSS, idle CPU (an empty cluster runs first)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measured per resident run")
    parser.add_argument("--relist-limit", type=float, default=300.0,
                        help="seconds a resident run waits for the relist to go quiet before measuring anyway")
    parser.add_argument("--kill", type=int, default=0,
                        help="a burst of this many, the operator SIGKILLed and restarted halfway (0: off)")
    parser.add_argument("--history", type=int, default=0,
                        help="bursts run with this many FineTuneJobs already in the cluster, as --resident makes them")
    parser.add_argument("--quota", action="store_true",
                        help="bursts run with the operator under a default quota that refuses nothing (each decision "
                             "counts its namespace's usage)")
    parser.add_argument("--pin", action="store_true",
                        help="the operator alone on one CPU, the emulator and the benchmark on the others (as on a "
                             "cluster: the latencies are the operator's own)")
    sys.exit(asyncio.run(main(parser.parse_args())))
