"""spec.evaluation: the adapter judged against the base model at the end of training (kubetune_trainer.evaluate).

A real QLoRA run of the tiny random Llama on the quickstart's data: eval.json holds base and adapter loss on the
same held-out rows, both models' greedy answers to each prompt, is listed with its sha256 in the manifest, and
its summary travels in the termination message. The adapter must beat the base on the held-out rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_trainer.__main__ import load_config
from kubetune_trainer.loop import RunOptions
from kubetune_trainer.progress import Log
from kubetune_trainer.runner import run_job

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_DATA = ROOT / "examples" / "data" / "pebblewave-support.jsonl"


def run_inprocess(config: Path, tmp_path: Path) -> tuple[int, Any, dict[str, Any]]:
    termination = tmp_path / f"termination-{config.stem}.json"
    code, result = run_job(load_config(str(config)), RunOptions(device="cpu", termination_log=str(termination)),
                           Log(fmt="json"))
    return code, result, json.loads(termination.read_text())


PROMPTS = ["What warranty do I get with my Aurora K2 kettle?", "How do I descale my kettle?"]


def test_eval_json_base_vs_adapter_on_the_same_rows(tmp_path: Path, tiny_model_dir: Path,
                                                    spec_for: Callable[..., dict[str, Any]],
                                                    write_config: Callable[..., Path]) -> None:
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, QUICKSTART_DATA, str(out), maxSteps=8, learningRate=2e-2, checkpointSteps=100,
                    gradientAccumulationSteps=1)
    spec["dataset"]["evalFraction"] = 0.1
    spec["evaluation"] = {"prompts": PROMPTS, "maxNewTokens": 6}
    code, result, summary = run_inprocess(write_config(spec), tmp_path)
    assert code == 0, summary

    document = json.loads((out / "eval.json").read_text())
    held = document["heldOut"]
    assert held["rows"] >= 1 and held["tokens"] > 0
    base, adapter = held["base"]["loss"], held["adapter"]["loss"]
    assert adapter == summary["evalLoss"]  # the adapter's score is the final eval loss: the same rows
    assert adapter < base - 0.1, (base, adapter)  # trained on the same kind of rows: it must beat the base
    assert held["base"]["perplexity"] > held["adapter"]["perplexity"] > 1
    assert [a["prompt"] for a in document["answers"]] == PROMPTS
    assert all(isinstance(a["base"], str) and isinstance(a["adapter"], str) for a in document["answers"])
    assert document["generation"] == {"greedy": True, "maxNewTokens": 6, "compareBase": True, "prompts": 2}

    manifest = json.loads((out / "adapter" / "manifest.json").read_text())
    entry = manifest["evaluation"]["files"]["eval.json"]
    assert entry["sha256"] == hashlib.sha256((out / "eval.json").read_bytes()).hexdigest()
    assert entry["bytes"] == (out / "eval.json").stat().st_size

    short = summary["evaluation"]  # what the operator reads into status.result
    assert short["baseLoss"] == base and short["adapterLoss"] == adapter and short["rows"] == held["rows"]
    assert short["uri"] == str(out / "eval.json") and short["prompts"] == 2
    assert [a["prompt"] for a in short["answers"]] == PROMPTS
    assert result.evaluation.loss_line().startswith(f"held-out loss {base:.3f} -> {adapter:.3f}")


def test_prompts_from_a_jsonl_file_cut_to_max_answers_without_base(tmp_path: Path, tiny_model_dir: Path,
                                                                   chat_file: Path,
                                                                   spec_for: Callable[..., dict[str, Any]],
                                                                   write_config: Callable[..., Path]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is the code word {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    spec = spec_for(tiny_model_dir, chat_file, str(out), maxSteps=1)
    spec["evaluation"] = {"prompts": str(prompts), "maxAnswers": 3, "maxNewTokens": 3, "compareBase": False}
    code, _, summary = run_inprocess(write_config(spec), tmp_path)
    assert code == 0, summary
    document = json.loads((out / "eval.json").read_text())
    assert [a["prompt"] for a in document["answers"]] == [f"What is the code word {i}?" for i in range(3)]
    assert all(a["base"] is None for a in document["answers"])
    assert document["heldOut"] is None and "evalFraction" in document["note"]  # no eval split in this spec
    assert summary["evaluation"]["adapterLoss"] is None


def test_a_prompts_file_without_the_prompt_field_fails_before_training(tmp_path: Path, tiny_model_dir: Path,
                                                                       chat_file: Path,
                                                                       spec_for: Callable[..., dict[str, Any]],
                                                                       write_config: Callable[..., Path]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"question": "where is it?"}) + "\n")
    spec = spec_for(tiny_model_dir, chat_file, str(tmp_path / "out"), maxSteps=1)
    spec["evaluation"] = {"prompts": str(prompts)}
    code, _, summary = run_inprocess(write_config(spec), tmp_path)
    assert code == 2 and summary["outcome"] == "InvalidInput"
    assert summary["error"].startswith("spec.evaluation.prompts prompts.jsonl line 2: needs a 'prompt' field")
    assert summary["steps"] == 0


def test_the_summary_fits_the_termination_message() -> None:
    """Kubernetes keeps 4096 bytes of a termination message: answers go first (eval.json keeps them whole)."""
    from kubetune.contracts import (
        SUMMARY_ANSWER_CHARS,
        EvalAnswer,
        EvalSummary,
        Outcome,
        TerminationSummary,
        clip,
    )

    long = "word " * 400
    assert clip(long) is not None and len(clip(long) or "") == SUMMARY_ANSWER_CHARS
    answers = [EvalAnswer(prompt=clip(long) or "", base=clip(long), adapter=clip(long) or "") for _ in range(3)]
    uri = "s3://bucket/" + "p" * 1500 + "/eval.json"
    summary = TerminationSummary(outcome=Outcome.SUCCEEDED, exit_code=0, adapter_uri=uri,
                                 evaluation=EvalSummary(base_loss=2.0, adapter_loss=1.0, answers=answers, uri=uri))
    text = summary.message()
    assert len(text.encode()) <= 4096
    parsed = TerminationSummary.parse(text)
    assert parsed is not None and parsed.evaluation is not None
    assert 1 <= len(parsed.evaluation.answers) < 3 and parsed.evaluation.adapter_loss == 1.0


def test_kubetune_train_prints_the_evaluation(capsys: Any) -> None:
    from kubetune_trainer.local import print_evaluation

    from kubetune.contracts import EvalAnswer, EvalSummary

    print_evaluation(EvalSummary(rows=6, tokens=812, base_loss=2.9, adapter_loss=0.4, base_perplexity=18.17,
                                 adapter_perplexity=1.49, prompts=5, uri="s3://bucket/out/eval.json",
                                 answers=[EvalAnswer(prompt="Warranty?", base="Unsure.", adapter="Three years.")]))
    printed = capsys.readouterr().out
    assert "Evaluation: held-out loss 2.900 -> 0.400 (perplexity 18.2 -> 1.49) on 6 rows, 812 tokens" in printed
    assert "Prompt: Warranty?\n  base:    Unsure.\n  adapter: Three years." in printed
    assert "All answers (4 more): s3://bucket/out/eval.json" in printed
