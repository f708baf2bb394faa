"""Print docs/vram.md's table: the estimator beside published QLoRA/LoRA memory figures.

    .venv/bin/python bench/vram_table.py            # markdown table
    .venv/bin/python bench/vram_table.py --check    # exit 1 if any row is outside +15% / -5%
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.planning.models import catalog_lookup
from kubetune.planning.vram import GiB, TrainingShape, estimate

ROWS = Path(__file__).resolve().parent.parent / "docs" / "vram_published.yaml"
UPPER, LOWER = 1.15, 0.95


@dataclass(frozen=True)
class Row:
    source: str
    model: str
    method: str
    settings: dict[str, Any]
    figure_gib: float
    part: str
    band: bool = True  # held to [LOWER, UPPER] x published (the estimate models the source's own recipe)
    differs: str = ""  # how the kubetune trainer differs from what the source ran

    def shape(self, recipe: str) -> TrainingShape:
        s = self.settings
        targets = s["targets"]
        return TrainingShape(
            method=self.method,  # type: ignore[arg-type]
            lora_r=s["r"],
            target_modules=targets if isinstance(targets, str) else tuple(targets),  # type: ignore[arg-type]
            seq_len=s["seq"],
            micro_batch=s["microBatch"],
            gradient_checkpointing=s["checkpointing"],
            lora_dropout=s.get("dropout", 0.05),
            optimizer=s.get("optimizer", "paged_adamw_32bit"),
            recipe=recipe,  # type: ignore[arg-type]
        )

    def estimate_gib(self, recipe: str = "hf") -> float:
        """recipe 'hf': the plain transformers + PEFT recipe most sources trained with; 'kubetune': what the
        planner charges the kubetune trainer for the same settings."""
        arch = catalog_lookup(self.model)
        if arch is None:
            raise SystemExit(f"{self.model}: not in the catalog")
        parts = estimate(arch, self.shape(recipe)).parts
        total = parts["base_weights"] + parts["quant_constants"] if self.part == "base" else sum(parts.values())
        return total / GiB

    @property
    def ratio(self) -> float:
        return self.estimate_gib() / self.figure_gib

    @property
    def ok(self) -> bool:
        return not self.band or LOWER <= self.ratio <= UPPER


def load_rows(path: Path = ROWS) -> list[Row]:
    raw = yaml.safe_load(path.read_text())["rows"]
    return [Row(r["source"], r["model"], r["method"], r["settings"], float(r["figureGiB"]), r["part"],
                bool(r.get("band", True)), str(r.get("differs", "")).strip()) for r in raw]


def markdown(rows: list[Row]) -> str:
    lines = [
        "| # | source | model | method | settings | published | estimate (hf) | ratio | kubetune trainer "
        "| how the kubetune trainer differs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, row in enumerate(rows, 1):
        s = row.settings
        targets = s["targets"] if isinstance(s["targets"], str) else ",".join(s["targets"])
        settings = (f"r={s['r']} {targets}, {s['seq']} tok x {s['microBatch']}, "
                    f"ckpt {'on' if s['checkpointing'] else 'off'}"
                    + (f", dropout {s['dropout']:g}" if "dropout" in s else ""))
        what = " (base only)" if row.part == "base" else ""
        ratio = f"{row.ratio:.2f}" if row.band else f"({row.ratio:.2f}, not held)"
        lines.append(
            f"| {n} | {row.source} | {row.model} | {row.method} | {settings} | {row.figure_gib:g} GiB{what} "
            f"| {row.estimate_gib():.2f} GiB | {ratio} | {row.estimate_gib('kubetune'):.2f} GiB "
            f"| {row.differs or DEFAULT_DIFFERS} |"
        )
    return "\n".join(lines) + "\n"


DEFAULT_DIFFERS = ("plain transformers + PEFT: full fp32 logits, an fp32 copy of every wrapped projection's input; "
                   "kubetune: one 512-position loss chunk, shared bf16 LoRA inputs, input embeddings in host memory")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    rows = load_rows()
    print(markdown(rows), end="")
    if args.check:
        bad = [r for r in rows if not r.ok]
        for r in bad:
            print(f"OUT OF BAND: {r.model} {r.method}: ratio {r.ratio:.2f}", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
