"""The operator's orders to the trainer: the job's identity, its spec, and the plan the operator resolved.

The operator writes `TrainerConfig.model_dump_json(by_alias=True)` into the job's ConfigMap under
`wire.CONFIG_FILE`; the pod runs `python -m kubetune_trainer --config <wire.CONFIG_PATH>`. Part of the core
(both sides import it, neither imports the other); no torch here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune.planning.plan import Knobs
from kubetune.spec import FineTuneJobSpec


class JobRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    namespace: str = "default"


class TrainerConfig(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    job: JobRef
    spec: FineTuneJobSpec
    knobs: Knobs
    gpu_class: str | None = Field(default=None, description="The class the plan chose (None on a local run).")
    gpu_count: int = 1
    vram_estimate_bytes: int = Field(default=0, description="The planner's estimate, exported as a metric.")
    device: Literal["cuda", "cpu"] | None = Field(default=None, description=(
        "The device the plan runs on: 'cuda' for a GPU plan (the operator's), so a pod without usable CUDA "
        "exits 5 instead of training on the CPU; None: whatever the machine has (a local run)."))
    attempt: int = Field(default=1, ge=1, description="1 + OOM escalations and restarts the operator made.")
