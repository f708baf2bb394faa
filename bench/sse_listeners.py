"""Event streams at scale: N concurrent Server-Sent Event listeners on one API process (not a test).

    .venv/bin/python bench/sse_listeners.py --listeners 200 --compare 1 --writes 30

The Kubernetes emulator (tests/api/kt_auth.AuthEmulator: tokens, RBAC, SelfSubjectAccessReviews) serves HTTP on
127.0.0.1 in this process; the API is the real `kubetune api` command in a child process (passthrough mode);
the listeners run in a second child process (`--listen`), each one a streaming GET of
/v1/namespaces/bench/events with its bearer token, as the page reads it. Once every listener has its
snapshot, this process writes a FineTuneJob's status `--writes` times (`--interval` apart), each write
a new `status.step`, and each listener timestamps (time.monotonic, one clock for all processes) the message
that carries it. Reported, for --listeners and side by side for --compare listeners:

- delay from the status write to each listener's receipt of it: p50, p99, max over writes x listeners;
- messages lost (a write some listener never received);
- the API process's memory (VmRSS) before the listeners, with them all connected, and per listener;
- the watch requests the API made (one per namespace and resource, whatever the listeners).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kmock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "operator"))
sys.path.insert(0, str(ROOT / "tests" / "api"))
from kt_auth import AuthEmulator, Rule, User  # noqa: E402

NS = "bench"
TOKEN = "bench-token"
JOB = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "watched", "namespace": NS},
       "spec": {"model": {"name": "meta-llama/Llama-3.1-8B-Instruct"},
                "dataset": {"source": "s3://datasets/bench.jsonl"}, "output": {"uri": "s3://adapters/bench/"}}}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- the listeners' process ---------------------------------------------------------------------------------

async def listen_one(client: httpx.AsyncClient, ready: asyncio.Queue[None], seen: dict[str, float],
                     last: str) -> None:
    async with client.stream("GET", f"/v1/namespaces/{NS}/events",
                             headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status_code == 200, response.status_code
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "snapshot":
                    ready.put_nowait(None)
                elif event == "job":
                    step = json.loads(line[6:])["summary"]["step"]
                    seen.setdefault(step, time.monotonic())
                    if step == last:
                        return


async def listen(url: str, count: int, writes: int) -> None:
    ready: asyncio.Queue[None] = asyncio.Queue()
    seen: list[dict[str, float]] = [{} for _ in range(count)]
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(30, read=None)) as client:
        tasks = [asyncio.create_task(listen_one(client, ready, seen[i], str(writes))) for i in range(count)]
        for _ in range(count):
            await ready.get()
        print("ready", flush=True)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    print(json.dumps(seen), flush=True)


# --- the bench ------------------------------------------------------------------------------------------------

async def round_of(kube: AuthEmulator, url: str, api_pid: int, count: int, writes: int,
                   interval: float) -> dict[str, Any]:
    before = rss_kib(api_pid)
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--listen", url, "--listeners", str(count), "--writes", str(writes),
        stdout=subprocess.PIPE, limit=1 << 24)
    assert child.stdout is not None
    line = await asyncio.wait_for(child.stdout.readline(), 120)
    assert line.strip() == b"ready", line
    await asyncio.sleep(0.5)
    connected = rss_kib(api_pid)
    written: dict[str, float] = {}
    for step in range(1, writes + 1):
        written[str(step)] = time.monotonic()
        await kube.patch_object("finetunejobs", NS, "watched", {"status": {"phase": "Running",
                                                                            "step": str(step)}})
        await asyncio.sleep(interval)
    seen: list[dict[str, float]] = json.loads(await asyncio.wait_for(child.stdout.readline(), 120))
    await child.wait()
    delays = [got[step] - at for got in seen for step, at in written.items() if step in got]
    lost = sum(1 for got in seen for step in written if step not in got)
    delays.sort()
    return {"listeners": count, "p50": statistics.median(delays), "p99": delays[int(0.99 * (len(delays) - 1))],
            "max": delays[-1], "lost": lost, "rss_before": before, "rss_connected": connected}


async def bench(args: argparse.Namespace) -> None:
    bench_user = User("bench", ("bench-devs", "system:authenticated"))
    rules = [Rule("bench-devs", verb, "finetunejobs.kubetune.io", NS) for verb in ("get", "list", "watch")]
    rules += [Rule("bench-devs", verb, "events", NS) for verb in ("list", "watch")]
    async with AuthEmulator(tokens={TOKEN: bench_user}, rules=rules) as kube, kmock.Server(kube) as server:
        await kube.put_object("finetunejobs", JOB)
        port = free_port()
        env = {**os.environ, "KUBETUNE_KUBE_URL": f"http://127.0.0.1:{server.port}", "KUBETUNE_API_AUTH": "passthrough",
               "KUBETUNE_API_SSE_HEARTBEAT": "15"}
        api = subprocess.Popen([sys.executable, "-m", "kubetune.cli", "api", "--host", "127.0.0.1", "--port",
                                str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=url) as client:
                for _ in range(300):
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.1)
            results = []
            for count in (args.compare, args.listeners):
                results.append(await round_of(kube, url, api.pid, count, args.writes, args.interval))
                await asyncio.sleep(1)
            watches = [r for r in kube if r.params.get("watch") == "true"]
        finally:
            api.terminate()
            api.wait(10)
    report(results, len(watches), args)


def report(results: list[dict[str, Any]], watches: int, args: argparse.Namespace) -> None:
    small, big = results
    print(f"{args.writes} status writes, {args.interval:g}s apart; one API process (passthrough), emulator here")
    print(f"{'':34}{small['listeners']:>10} {big['listeners']:>10} {'ratio':>8}")
    for key, label, scale in (("p50", "write -> listener p50 (ms)", 1000), ("p99", "write -> listener p99 (ms)", 1000),
                              ("max", "write -> listener max (ms)", 1000)):
        a, b = small[key] * scale, big[key] * scale
        print(f"{label:34}{a:>10.1f} {b:>10.1f} {b / a if a else float('nan'):>8.2f}")
    print(f"{'messages lost':34}{small['lost']:>10} {big['lost']:>10}")
    for key, label in (("rss_before", "API RSS before (MiB)"), ("rss_connected", "API RSS connected (MiB)")):
        print(f"{label:34}{small[key] / 1024:>10.1f} {big[key] / 1024:>10.1f}")
    per = (big["rss_connected"] - big["rss_before"]) / big["listeners"]
    print(f"{'API RSS per listener (KiB)':34}{'':>10} {per:>10.1f}")
    print(f"watch requests the API made, both rounds: {watches} (one feed per namespace: jobs + events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listeners", type=int, default=200)
    parser.add_argument("--compare", type=int, default=1)
    parser.add_argument("--writes", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--listen", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.listen:
        asyncio.run(listen(args.listen, args.listeners, args.writes))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
