"""`kubetune plan | train | serve-manifest | crd | operator | api` — one entry point for people and pipelines.

Exit codes: 0 ok, 2 invalid input (bad YAML, wrong kind, a bad field: the message names it),
1 anything else. `kubetune train` adds the trainer's codes (3 out of GPU memory, 4 storage error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kubetune.errors import KubetuneError
from kubetune.jobfile import load_jobs
from kubetune.planning.gpus import GpuCatalog, load_catalog
from kubetune.planning.placement import Supply, supply_of
from kubetune.planning.plan import Plan, make_plan
from kubetune.planning.vram import GiB
from kubetune.sources import model_architecture
from kubetune.spec import FineTuneJob


def plan_job(job: FineTuneJob, catalog: GpuCatalog, supply: Supply | None = None) -> Plan:
    return make_plan(job.spec, model_architecture(job.spec.model.name, job.spec.model.source), catalog,
                     supply=supply)


def render_plan(job: FineTuneJob, plan: Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{job.metadata.namespace}/{job.metadata.name}[/]: {plan.model} {plan.method.upper()} -> "
        f"[bold green]{plan.label()}[/] ({plan.hourly_cost:.2f}/h), estimate [bold]"
        f"{plan.vram_estimate_bytes / GiB:.1f} GiB[/] of {plan.usable_bytes_per_gpu / GiB:.1f} GiB usable per GPU"
    )
    parts = Table(title="VRAM estimate per GPU", title_justify="left")
    parts.add_column("part")
    parts.add_column("GiB", justify="right")
    parts.add_column("share", justify="right")
    for name, value in plan.breakdown.items():
        parts.add_row(name, f"{value / GiB:.2f}", f"{value / plan.vram_estimate_bytes:.0%}")
    parts.add_row("[bold]total[/]", f"[bold]{plan.vram_estimate_bytes / GiB:.2f}[/]", "100%")
    console.print(parts)
    knobs = Table(title="Knobs", title_justify="left")
    knobs.add_column("knob")
    knobs.add_column("value")
    for name, value in plan.knobs.model_dump(by_alias=True).items():
        knobs.add_row(name, str(value).lower() if isinstance(value, bool) else str(value))
    console.print(knobs)
    console.print("[bold]Why[/]")
    for reason in plan.reasons:
        console.print(f"  - {reason}")
    console.print(shapes_table(plan))
    console.print()


SHAPE_NOTES = {"candidate": "", "dearer": "dearer/h", "unavailable": "no nodes"}  # Alternative.note has it all
SHAPE_LEGEND = {"dearer": "dearer/h: a class dearer per GPU-hour than the cheapest single GPU that holds the job, "
                          "not a candidate",
                "unavailable": "no nodes: the cluster cannot run it (the reasons say why)"}


def shapes_table(plan: Plan) -> Any:
    """The chosen shape and what it was compared with, by estimated cost per job (price/h x estimated hours)."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"Shapes compared (cost = price/h x estimated hours, {plan.per()})", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for column in ("shape", "GiB", "/h", "hours", "cost", "x cost", "x time", "note"):
        table.add_column(column, justify="left" if column in ("shape", "note") else "right",
                         no_wrap=column != "note")
    table.add_row(f"[bold green]{plan.label()}[/]", f"{plan.lean_bytes_per_gpu / GiB:.1f}", f"{plan.hourly_cost:.2f}",
                  f"{plan.estimated_hours:.1f}", f"{plan.estimated_cost:.2f}", "1.00", "1.00", "chosen")
    for alt in plan.alternatives:
        hours = alt.step_seconds * plan.steps / 3600
        table.add_row(alt.label(), f"{alt.vram_estimate_bytes / GiB:.1f}", f"{alt.hourly_cost:.2f}", f"{hours:.1f}",
                      f"{alt.hourly_cost * hours:.2f}", f"{alt.job_cost_ratio:.2f}", f"{alt.time_ratio:.2f}",
                      SHAPE_NOTES[alt.kind])
    legend = [text for kind, text in SHAPE_LEGEND.items() if any(a.kind == kind for a in plan.alternatives)]
    if legend:
        table.caption, table.caption_justify = "; ".join(legend), "left"
    return table


def cmd_plan(args: argparse.Namespace) -> int:
    provisionable = tuple(n for n in args.provisionable.replace(",", " ").split() if n)
    catalog = load_catalog(Path(args.gpu_catalog) if args.gpu_catalog else None, provisionable or None)
    jobs = load_jobs(args.file)
    supply = None
    if args.kubeconfig or args.context:  # against a live cluster: the classes it has nodes of, or can provision
        from kubetune.cluster import read_inventory

        supply = supply_of(read_inventory(args.kubeconfig, args.context), catalog)
    plans = [(job, plan_job(job, catalog, supply)) for job in jobs]
    if args.output == "json":
        out = [plan.summary() for _, plan in plans]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump_all([plan.summary() for _, plan in plans], sort_keys=False), end="")
    else:
        for job, plan in plans:
            render_plan(job, plan)
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune.crd import crd_yaml

    print(crd_yaml(), end="")
    return 0


def cmd_serve_manifest(args: argparse.Namespace) -> int:
    from kubetune.serving import render, serving_of

    if args.file:
        jobs = [job for job in load_jobs(args.file) if not args.name or job.metadata.name == args.name]
        if len(jobs) != 1:
            raise KubetuneError(f"-f {args.file}: " + (f"no FineTuneJob named {args.name}" if args.name else
                                f"{len(jobs)} FineTuneJobs; name the one to serve"))
        if not args.adapter_uri:
            raise KubetuneError("-f needs --adapter-uri (the job's adapter folder, e.g. s3://bucket/prefix/adapter)")
        obj = jobs[0].model_dump(mode="json", by_alias=True, exclude_none=True)
    elif args.name:
        from kubetune.cluster import read_job

        obj = read_job(args.kubeconfig, args.context, args.namespace, args.name)
    else:
        raise KubetuneError("give the FineTuneJob's NAME (read from the cluster) or -f job.yaml --adapter-uri URI")
    print(render(serving_of(obj, args.adapter_uri), args.output), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from kubetune_trainer.local import LocalOptions, run_local
    except ImportError as exc:
        hint = "pip install 'kubetune[trainer]'"
        raise KubetuneError(f"kubetune train needs the trainer extra: {hint} ({exc})") from None
    return run_local(LocalOptions(file=args.file, output=args.output, max_steps=args.max_steps,
                                  metrics_port=args.metrics_port or 0, device=args.device, prompt=args.prompt,
                                  termination_log=args.termination_log, nproc_per_node=args.nproc_per_node))


def cmd_operator(args: argparse.Namespace) -> int:
    try:
        from kubetune_operator.main import OperatorOptions, run_operator
    except ImportError as exc:
        raise KubetuneError(f"kubetune operator needs the operator extra: pip install 'kubetune[operator]' ({exc})") \
            from None
    return run_operator(OperatorOptions(namespaces=tuple(args.namespace or ()), peering=args.peering,
                                        metrics_port=args.metrics_port))


def cmd_api(args: argparse.Namespace) -> int:
    try:
        from kubetune.api import run_api
    except ImportError as exc:
        raise KubetuneError(f"kubetune api needs the api extra: pip install 'kubetune[api]' ({exc})") from None
    return run_api(args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune open-weight LLMs with QLoRA/LoRA from one FineTuneJob YAML.",
        epilog="Exit codes: 0 ok, 1 error, 2 invalid input, 3 out of GPU memory (train), 4 storage error (train).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="estimate VRAM and choose the GPU class, count and knobs")
    plan.add_argument("-f", "--file", required=True, help="FineTuneJob YAML (several documents allowed), or -")
    plan.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    plan.add_argument("--gpu-catalog", help="YAML that overrides or extends the GPU catalog")
    plan.add_argument("--kubeconfig", help="plan against this cluster's GPU nodes (default without it and "
                      "--context: the whole catalog)")
    plan.add_argument("--context", help="the kubeconfig context to use (default: its current-context)")
    plan.add_argument("--provisionable", default="", help="comma-separated GPU classes the cluster can scale up "
                      "from zero (with --kubeconfig/--context)")
    plan.set_defaults(func=cmd_plan)

    crd = sub.add_parser("crd", help="print the FineTuneJob CustomResourceDefinition")
    crd.set_defaults(func=cmd_crd)

    serve = sub.add_parser("serve-manifest", help="print ready-to-apply serving text for a job's adapter: a KServe "
                           "LLMInferenceService (kubectl apply -f -) and the vLLM command lines")
    serve.add_argument("name", nargs="?", help="the FineTuneJob (read from the cluster with your kubeconfig)")
    serve.add_argument("-n", "--namespace", default="default")
    serve.add_argument("-f", "--file", help="render offline from this FineTuneJob YAML instead (needs --adapter-uri)")
    serve.add_argument("--adapter-uri", help="the adapter folder to serve (default: the job's status.adapterUri)")
    serve.add_argument("-o", "--output", choices=["kserve", "vllm", "json"], default="kserve")
    serve.add_argument("--kubeconfig", help="the kubeconfig to read the job with (default: $KUBECONFIG, "
                       "~/.kube/config)")
    serve.add_argument("--context", help="the kubeconfig context to use (default: its current-context)")
    serve.set_defaults(func=cmd_serve_manifest)

    train = sub.add_parser("train", help="run the fine-tune on this machine (GPU if present, else CPU)")
    train.add_argument("-f", "--file", required=True, help="FineTuneJob YAML, or -")
    train.add_argument("--output", help="override spec.output.uri: a directory or s3://bucket/prefix/")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--metrics-port", type=int, default=0, help="serve /metrics and /status here (0: off)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument("--prompt", help="print the model's answer to this prompt before and after training "
                       "(default: the job's kubetune.io/sample-prompt annotation)")
    train.add_argument("--termination-log", help="also write the trainer's JSON summary to this file")
    train.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                       help="data-parallel ranks on this machine, started by torchrun (one per GPU; gloo on the "
                            "CPU). The same optimizer steps as one rank: the accumulation is divided across ranks")
    train.set_defaults(func=cmd_train)

    operator = sub.add_parser("operator", help="run the FineTuneJob operator (kopf)")
    operator.add_argument("--namespace", action="append", help="watch only these namespaces (default: all)")
    operator.add_argument("--peering", default=None, help="kopf peering name for HA (default: standalone)")
    operator.add_argument("--metrics-port", type=int, default=8080, help="/metrics and /healthz port")
    operator.set_defaults(func=cmd_operator)
    api = sub.add_parser("api", help="serve the self-serve REST API (FastAPI; OpenAPI docs at /docs)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(func=cmd_api)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KubetuneError as exc:
        print(f"error: {exc}".replace("\n", "\nerror: "), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kubetune plan ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
