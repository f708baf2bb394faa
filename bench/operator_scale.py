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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import yaml

from kubetune import wire
from kubetune.spec import API_GROUP, API_VERSION, PLURAL

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "operator"))
from kt_cluster import CLUSTER, node  # noqa: E402
from kt_emulator import KubeEmulator  # noqa: E402

NS = "bench"


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


async def run_one(jobs: int, timeout: float, source: Path | None = None) -> dict[str, Any]:
    """A fresh emulator and operator process (from `source`, a checkout, when given); one burst of `jobs`."""
    async with KubeEmulator() as api, kmock.Server(api) as server:
        url = str(server.url).rstrip("/")
        for name, labels, gpus in CLUSTER:
            await api.put_object("nodes", node(name, labels, gpus))
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
                "clusters": [{"name": "emulator", "cluster": {"server": url}}],
                "users": [{"name": "bench", "user": {"token": "bench"}}],
                "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "bench"}}],
            }))
            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_POLL_INTERVAL": "10"}
            if source is not None:  # the older checkout's packages shadow the installed (editable) ones
                paths = [str(source), str(source / "operator"), str(source / "trainer")]
                env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            child = subprocess.Popen(
                [sys.executable, "-c", "import sys; from kubetune.cli import main; sys.exit(main())",
                 "operator", "--metrics-port", "0"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "operator.log", "w"),  # noqa: SIM115
            )
            try:
                return await _measure(api, url, child, jobs, timeout, Path(tmp) / "operator.log")
            finally:
                child.terminate()
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()


async def _measure(api: KubeEmulator, url: str, child: subprocess.Popen[bytes], jobs: int, timeout: float,
                   log: Path) -> dict[str, Any]:
    # Ready when the operator watches FineTuneJobs (a watch request arrived) and has settled.
    deadline = time.perf_counter() + 60
    while api.request_count("GET", "finetunejobs") == 0:
        if child.poll() is not None or time.perf_counter() > deadline:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise SystemExit("the operator did not start")
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.0)
    idle_rss = memory_kib(child.pid)
    before = dict(api.counts)
    operator_cpu, bench_cpu = cpu_seconds(child.pid), time.process_time()

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def create(body: dict[str, Any]) -> None:
            path = url + wire.collection_path(f"{API_GROUP}/{API_VERSION}", PLURAL, NS)
            async with session.post(path, json=body) as response:
                assert response.status == 201, await response.text()

        await asyncio.gather(*(create(ftj(i)) for i in range(jobs)))
    posted = time.perf_counter() - started

    ftj_key = api.kind_of("finetunejobs").key

    def queued() -> int:
        return sum(1 for i in range(jobs) if ((ftj_key, NS, f"ftj-{i:04d}"), "Queued") in api.phase_at)

    deadline = started + timeout
    while queued() < jobs and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let trailing Events land before counting requests
    peak_rss = memory_kib(child.pid)
    operator_cpu, bench_cpu = cpu_seconds(child.pid) - operator_cpu, time.process_time() - bench_cpu

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
        "operator_cpu": operator_cpu, "bench_cpu": bench_cpu,
    }


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


async def main(sizes: list[int], timeout: float, baseline: str | None = None) -> int:
    before: dict[str, Any] | None = None
    if baseline:
        with tempfile.TemporaryDirectory() as tmp:
            source = worktree(baseline, Path(tmp) / "baseline")
            try:
                print(f"=== before: {baseline} ===")
                runs = []
                for jobs in sizes:
                    runs.append(await run_one(jobs, timeout, source))
                    report(runs[-1])
                if len(runs) > 1:
                    compare(runs[0], runs[-1])
                before = runs[-1]
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(source)], check=False)
        print("=== after: this checkout ===")
    results = []
    for jobs in sizes:
        result = await run_one(jobs, timeout)
        report(result)
        results.append(result)
    if len(results) > 1:
        compare(results[0], results[-1])
    large = results[-1]
    if before is not None:
        side_by_side(str(baseline), before, large)
    ok = large["made"] == large["jobs"] and percentile(large["latencies"], 0.99) < 2.0 and \
        sum(large["requests"].values()) / large["jobs"] <= 8
    print(f"Targets for {large['jobs']} jobs (p99 create -> Job < 2 s, <= 8 API requests per job): "
          f"{'met' if ok else 'NOT met'}")
    return 0 if all(r["made"] == r["jobs"] for r in results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500, help="FineTuneJobs in the measured burst")
    parser.add_argument("--compare", type=int, default=50,
                        help="also run a burst this size first and print the per-job ratios (0: off)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all Jobs")
    parser.add_argument("--baseline", help="a git revision whose operator runs the same bursts first")
    args = parser.parse_args()
    sizes = ([args.compare] if args.compare else []) + [args.jobs]
    sys.exit(asyncio.run(main(sizes, args.timeout, args.baseline)))
