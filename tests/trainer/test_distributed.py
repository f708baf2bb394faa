"""Data-parallel training on torch.distributed (gloo on the CPU), started by torchrun through launch.py: two
ranks give the adapter one rank gives (same steps, same rows per step, loss over the global token count), a
checkpoint from two ranks resumes on one, and the attempt exits with the trainer's codes, not torchrun's 1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from kubetune_trainer.distributed import RANK_SUMMARIES_ENV, Ranks, micro_batches_of, ranks_from_env
from kubetune_trainer.launch import exit_code, launch, ranks_environment, threads_per_rank
from kubetune_trainer.stop import LAUNCHER_PID_ENV

from kubetune.errors import SpecError

from .conftest import ROOT, free_port, run_one_rank

ADAPTER = "adapter/adapter_model.safetensors"


# --- pure parts -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("count", "rank", "world", "expected"), [
    (4, 0, 1, [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0)]),
    (4, 0, 2, [(0, 1.0), (2, 1.0)]),
    (4, 1, 2, [(1, 1.0), (3, 1.0)]),
    (3, 0, 2, [(0, 1.0), (2, 1.0)]),
    (3, 1, 2, [(1, 1.0), (1, 0.0)]),          # fewer than rank 0: a weight-0 copy keeps DDP in step
    (1, 1, 2, [(0, 0.0)]),                    # nothing left for rank 1 (end of an epoch)
    (5, 3, 4, [(3, 1.0), (3, 0.0)]),
])
def test_micro_batches_are_dealt_round_robin(count: int, rank: int, world: int,
                                              expected: list[tuple[int, float]]) -> None:
    assert micro_batches_of(count, Ranks(rank, world)) == expected


def test_every_micro_batch_runs_once_with_weight_one() -> None:
    for world in (1, 2, 3, 4, 8):
        for count in range(1, 20):
            real = sorted(i for r in range(world) for i, w in micro_batches_of(count, Ranks(r, world)) if w)
            assert real == list(range(count))
            assert len({len(micro_batches_of(count, Ranks(r, world))) for r in range(world)}) == 1


@pytest.mark.parametrize(("env", "expected"), [
    ({}, Ranks(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, Ranks(3, 4, 1)),
])
def test_ranks_from_torchrun_env(env: dict[str, str], expected: Ranks) -> None:
    assert ranks_from_env(env) == expected


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "two"}, "RANK='two': must be an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "need 0 <= RANK < WORLD_SIZE"),
])
def test_bad_torchrun_env_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ranks_from_env(env)


@pytest.mark.parametrize(("failures", "expected"), [
    ([(1, 3), (0, 1)], (1, 3)),               # rank 1 out of memory; rank 0 then lost its peer
    ([(0, 1), (1, 3)], (1, 3)),               # the cause wins even if observed second
    ([(0, 143), (1, 143)], (0, 143)),         # SIGTERM everywhere: preempted, checkpoint written
    ([(1, -15), (0, 143)], (1, 143)),
    ([(1, 1), (0, 143)], (1, 1)),
    ([(0, -9)], (0, 137)),                    # SIGKILL as a shell reports it
    ([(2, 4)], (2, 4)),
])
def test_attempt_exit_code_from_failed_ranks(failures: list[tuple[int, int]], expected: tuple[int, int]) -> None:
    assert exit_code(failures) == expected


def test_threads_are_shared_between_ranks() -> None:
    assert threads_per_rank(2, 2) == 1
    assert threads_per_rank(2, 16) == 8
    assert threads_per_rank(4, 2) == 1
    assert threads_per_rank(1, None) == 1


def test_launch_environment_is_restored_after_the_ranks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RANK_SUMMARIES_ENV, "/kept")
    monkeypatch.delenv(LAUNCHER_PID_ENV, raising=False)
    with ranks_environment({RANK_SUMMARIES_ENV: "/tmp/x", LAUNCHER_PID_ENV: "42"}):
        assert os.environ[RANK_SUMMARIES_ENV] == "/tmp/x" and os.environ[LAUNCHER_PID_ENV] == "42"
    assert os.environ[RANK_SUMMARIES_ENV] == "/kept" and LAUNCHER_PID_ENV not in os.environ


@pytest.mark.parametrize(("launcher", "outcome"), [
    (None, "not armed"),         # not started by launch.py: nothing to do
    ("parent", "armed"),         # the launcher is alive: Linux will SIGKILL this rank when it dies
    ("1", -signal.SIGKILL),      # the launcher died before the rank armed itself: the rank goes at once
])
def test_a_rank_dies_with_its_launcher(launcher: str | None, outcome: str | int) -> None:
    code = "from kubetune_trainer.stop import die_with_launcher; print('armed' if die_with_launcher() else 'not armed')"
    env = {k: v for k, v in os.environ.items() if k != LAUNCHER_PID_ENV}
    if launcher is not None:
        env[LAUNCHER_PID_ENV] = str(os.getpid()) if launcher == "parent" else launcher
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert (done.stdout.strip() or done.returncode) == outcome, (done.returncode, done.stderr)


# --- real runs: gloo on 127.0.0.1 -----------------------------------------------------------------------

def ranks_argv(config: Path, termination: Path, nproc: int = 2, metrics_port: int = 0,
               device: str = "cpu") -> list[str]:
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "kubetune_trainer", "--config", str(config),
            "--device", device, "--metrics-port", str(metrics_port), "--termination-log", str(termination)]


def step_lines(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith('{"ts"')]


def trained(config: Path, termination: Path, nproc: int, capfd: pytest.CaptureFixture[str]
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train `config` on `nproc` ranks (1: in this process; more: torchrun); its summary and rank 0's log lines."""
    code = run_one_rank(config, termination) if nproc == 1 else launch(ranks_argv(config, termination, nproc))
    summary = json.loads(termination.read_text())
    assert code == 0, summary
    return summary, step_lines(capfd.readouterr().err)


def assert_same_adapter(a: dict[str, Any], b: dict[str, Any], atol: float = 2e-5) -> float:
    """Returns the largest absolute difference."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-3, atol=atol), \
            (key, float((a[key].float() - b[key].float()).abs().max()))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture
def trainer_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun starts `python -m kubetune_trainer` as new processes: they import what this checkout has."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "trainer")]))
    monkeypatch.setenv("KUBETUNE_LOG_FORMAT", "json")


@pytest.mark.slow
def test_two_ranks_train_the_one_rank_adapter(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                              spec_for: Callable[..., dict[str, Any]],
                                              write_config: Callable[..., Path], trainer_pythonpath: None,
                                              adapter_tensors: Callable[[Path], dict[str, Any]],
                                              capfd: pytest.CaptureFixture[str]) -> None:
    """3 micro-batches per step over 2 ranks (2 + 1 and a weight-0 pad): the uneven case, accumulation without
    sync on rank 0, and an eval split sharded over the ranks. Adam hides a constant factor on the gradient, so
    the logged pre-clipping gradient norms are compared too (rank 0's JSON log lines)."""
    adapters, summaries, norms = [], [], []
    for nproc in (1, 2):
        out = tmp_path / f"ranks-{nproc}"
        spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=4, microBatchSize=2,
                        gradientAccumulationSteps=3, checkpointSteps=100, loggingSteps=1)
        spec["dataset"]["evalFraction"] = 0.25
        termination = tmp_path / f"summary-{nproc}.json"
        summary, lines = trained(write_config(spec, name=f"ddp-{nproc}"), termination, nproc, capfd)
        summaries.append(summary)
        adapters.append(adapter_tensors(out / ADAPTER))
        norms.append([line["gradNorm"] for line in lines if line["event"] == "step"])
    one, two = summaries
    assert one["steps"] == two["steps"] == 4
    assert two["finalLoss"] == pytest.approx(one["finalLoss"], rel=1e-4)
    assert two["evalLoss"] == pytest.approx(one["evalLoss"], rel=1e-4)
    assert len(norms[0]) == 4 and norms[1] == pytest.approx(norms[0], rel=1e-3)
    assert_same_adapter(adapters[0], adapters[1])


@pytest.mark.slow
def test_kubetune_train_nproc_per_node_gives_the_same_adapter(tmp_path: Path, tiny_model_dir: Path,
                                                               chat_file: Path, trainer_pythonpath: None,
                                                               adapter_tensors: Callable[[Path], dict[str, Any]],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from kubetune.cli import main

    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "local-ranks"},
           "spec": {"model": {"source": str(tiny_model_dir)}, "dataset": {"source": str(chat_file)},
                    "lora": {"r": 4, "dropout": 0.0},
                    "training": {"maxSeqLength": 128, "microBatchSize": 1, "gradientAccumulationSteps": 4,
                                 "learningRate": 1e-3},
                    "output": {"uri": "s3://not-used/when-overridden"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    adapters = []
    for extra in ([], ["--nproc-per-node", "2"]):
        out = tmp_path / f"out{len(extra)}"
        assert main(["train", "-f", str(path), "--output", str(out), "--max-steps", "3", "--device", "cpu",
                     *extra]) == 0
        assert "Trained 3 steps" in capsys.readouterr().out
        adapters.append(adapter_tensors(out / ADAPTER))
    assert_same_adapter(adapters[0], adapters[1])
    assert main(["train", "-f", str(path), "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node: must be >= 1, got 0" in capsys.readouterr().err


def still_running(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those of `processes` still running after `within` seconds (a zombie has stopped: its new parent, this
    machine's init, may be slow to reap it)."""
    def running(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + within
    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                  spec_for: Callable[..., dict[str, Any]],
                                                  write_config: Callable[..., Path], trainer_env: dict[str, str],
                                                  adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    """Elastic: the launcher of two ranks is SIGKILLed after a checkpoint, and its ranks die with it (torchrun
    starts them in sessions of their own: without stop.die_with_launcher they trained on beside the next
    attempt); the next attempt has one rank and ends with the adapter of an uninterrupted one-rank run. On the
    way, rank 0 exports every rank's memory peak."""
    steps = 8
    reference = tmp_path / "reference"
    spec = spec_for(tiny_model_dir, chat_file, str(reference), maxSteps=steps, checkpointSteps=3, loggingSteps=1)
    assert run_one_rank(write_config(spec, name="ref"), tmp_path / "ref.json") == 0

    out = tmp_path / "elastic"
    config = write_config(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=steps, checkpointSteps=3,
                                   loggingSteps=1), name="elastic")
    port = free_port()
    log = (tmp_path / "ranks.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kubetune_trainer.launch",
                             *ranks_argv(config, tmp_path / "killed.json", metrics_port=port)], cwd=ROOT,
                            env=trainer_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    marker = out / "checkpoints" / "step-00000003" / "COMPLETE"
    ranks: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "ranks.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint at step 3"
            time.sleep(0.05)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        ranks = psutil.Process(proc.pid).children(recursive=True)
        assert len(ranks) == 2, ranks
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, as the OOM killer would
        proc.wait(timeout=30)
        assert not still_running(ranks, within=10), "ranks outlived their SIGKILLed launcher"
    finally:
        log.close()
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "adapter").exists()

    peaks = {line.split('rank="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
             for line in metrics.splitlines() if line.startswith("kubetune_rank_memory_peak_bytes{")}
    assert set(peaks) == {"0", "1"} and all(v > 50e6 for v in peaks.values()), peaks

    termination = tmp_path / "resumed.json"
    assert run_one_rank(config, termination) == 0
    assert json.loads(termination.read_text())["steps"] == steps
    assert_same_adapter(adapter_tensors(reference / ADAPTER), adapter_tensors(out / ADAPTER))


@pytest.mark.slow
def test_storage_error_on_every_rank_exits_4_not_1(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                   s3_endpoint: str, spec_for: Callable[..., dict[str, Any]],
                                                   write_config: Callable[..., Path], trainer_pythonpath: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    spec = spec_for(tiny_model_dir, chat_file, "s3://no-such-bucket-for-ranks/out/")
    termination = tmp_path / "summary.json"
    assert launch(ranks_argv(write_config(spec), termination)) == 4
    assert json.loads(termination.read_text())["outcome"] == "StorageError"


# --- FSDP2 (resources.strategy: fsdp) ---------------------------------------------------------------------

def fsdp_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "resources": {"strategy": "fsdp"}}


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp_two_ranks_train_the_one_rank_qlora_adapter(tied: bool, request: pytest.FixtureRequest, tmp_path: Path,
                                                          chat_file: Path, spec_for: Callable[..., dict[str, Any]],
                                                          write_config: Callable[..., Path], trainer_pythonpath: None,
                                                          adapter_tensors: Callable[[Path], dict[str, Any]],
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    """FSDP2 over 2 gloo ranks against one rank, QLoRA (NF4 stored in the compute dtype, so it shards): 3
    micro-batches per step (2 + 1 and a weight-0 pad; rank 0 accumulates without gradient sync), clipping
    active every step (it must use the whole gradient's norm: a rank-local norm changes the adapter), a
    checkpoint gathered mid-run, 3 eval batches (2 + 1 and a pad: every rank runs as many forwards). Same
    steps, losses and pre-clipping norms, the same adapter, and PEFT loads it as it is. Untied: the input
    embedding table is a unit of its own (fsdp.units)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tiny_model_dir: Path = request.getfixturevalue("tiny_model_dir" if tied else "tiny_untied_model_dir")

    adapters, summaries, norms = [], [], []
    for nproc in (1, 2):
        out = tmp_path / f"fsdp-{nproc}"
        spec = fsdp_spec(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=4, microBatchSize=1,
                                  gradientAccumulationSteps=3, checkpointSteps=2, loggingSteps=1, maxGradNorm=0.05))
        spec["dataset"]["evalFraction"] = 0.25
        termination = tmp_path / f"summary-{nproc}.json"
        summary, lines = trained(write_config(spec, name=f"fsdp-{nproc}"), termination, nproc, capfd)
        summaries.append(summary)
        adapters.append(adapter_tensors(out / ADAPTER))
        norms.append([line["gradNorm"] for line in lines if line["event"] == "step"])
        if nproc == 2:
            units = "2 units" if tied else "3 units"
            assert any(line["event"] == "ranks" and f"FSDP2: {units} (decoder layers, an untied input embedding) "
                       "and the root sharded" in line["message"]
                       for line in lines), [line for line in lines if line["event"] == "ranks"]
    one, two = summaries
    assert one["steps"] == two["steps"] == 4
    assert two["finalLoss"] == pytest.approx(one["finalLoss"], rel=1e-4)
    assert two["evalLoss"] == pytest.approx(one["evalLoss"], rel=1e-4)
    assert len(norms[0]) == 4 and min(norms[0]) > 0.05  # clipped in every step
    assert norms[1] == pytest.approx(norms[0], rel=1e-3)
    print(f"fsdp 2 ranks vs 1: adapter max abs diff {assert_same_adapter(adapters[0], adapters[1]):.3g}")

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "fsdp-2" / "adapter"))
    weights = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert_same_adapter(weights, adapters[1], atol=0)


@pytest.mark.slow
def test_checkpoints_move_between_one_rank_and_fsdp(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                    spec_for: Callable[..., dict[str, Any]],
                                                    write_config: Callable[..., Path], trainer_pythonpath: None,
                                                    adapter_tensors: Callable[[Path], dict[str, Any]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit LoRA with gradient checkpointing (recompute inside FSDP units). One rank stops at step 3 (an
    injected fault) with a checkpoint at step 2; 2 FSDP ranks resume it (the one-rank optimizer state is
    sharded), checkpoint at step 4 and stop at step 5; one rank resumes that (the shards gathered into the
    one-rank format) and finishes. The adapter is the uninterrupted one-rank run's."""
    steps = 6

    def spec(out: Path) -> dict[str, Any]:
        s = fsdp_spec(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=steps, checkpointSteps=2,
                               gradientCheckpointing=True))
        return {**s, "method": "lora"}

    reference = tmp_path / "reference"
    assert run_one_rank(write_config(spec(reference), name="ref"), tmp_path / "ref.json") == 0
    out = tmp_path / "moved"
    config = write_config(spec(out), name="moved")
    attempts = [(1, 3, 0), (2, 5, 2), (1, None, 4)]  # ranks, fault at step, expected resume step
    for n, (nproc, fault, resumed) in enumerate(attempts):
        if fault:
            monkeypatch.setenv("KUBETUNE_FAULT_OOM_AT_STEP", str(fault))
        else:
            monkeypatch.delenv("KUBETUNE_FAULT_OOM_AT_STEP", raising=False)
        termination = tmp_path / f"attempt-{n}.json"
        code = run_one_rank(config, termination) if nproc == 1 else launch(ranks_argv(config, termination, nproc))
        summary = json.loads(termination.read_text())
        assert (code, summary["resumedFromStep"]) == (3 if fault else 0, resumed), summary
        assert summary["steps"] == (fault - 1 if fault else steps)
    print(f"1 -> fsdp 2 -> 1 ranks vs 1: adapter max abs diff "
          f"{assert_same_adapter(adapter_tensors(reference / ADAPTER), adapter_tensors(out / ADAPTER)):.3g}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs 2 CUDA GPUs (NCCL refuses two ranks "
                    "on one device); the gloo tests above run the same code on the CPU")
def test_fsdp_on_two_gpus_trains_the_one_gpu_qlora_adapter(tmp_path: Path, tiny_model_dir: Path, chat_file: Path,
                                                           spec_for: Callable[..., dict[str, Any]],
                                                           write_config: Callable[..., Path], trainer_pythonpath: None,
                                                           adapter_tensors: Callable[[Path], dict[str, Any]]) -> None:
    """The CUDA placement: the 4-bit model is quantized on the host, FSDP moves each unit's shards (and
    bitsandbytes' quantization state) to the rank's GPU, NCCL gathers and reduce-scatters; a checkpoint is
    gathered mid-run. Same steps and adapter as one GPU."""
    adapters, steps = [], []
    for nproc in (1, 2):
        out = tmp_path / f"gpu-{nproc}"
        spec = fsdp_spec(spec_for(tiny_model_dir, chat_file, str(out), maxSteps=4, gradientAccumulationSteps=2,
                                  checkpointSteps=2))
        termination = tmp_path / f"gpu-{nproc}.json"
        config = write_config(spec, name=f"gpu-{nproc}")
        code = (run_one_rank(config, termination, "cuda") if nproc == 1
                else launch(ranks_argv(config, termination, nproc, device="cuda")))
        summary = json.loads(termination.read_text())
        assert code == 0, summary
        steps.append(summary["steps"])
        adapters.append(adapter_tensors(out / ADAPTER))
    assert steps == [4, 4]
    assert_same_adapter(adapters[0], adapters[1], atol=1e-4)
