"""Which cluster objects the operator believes: only its own children.

Labels are not proof: anyone who may create pods in a namespace can copy a trainer pod's labels, exit 0
with a termination message naming any adapter URI, or serve a /status the operator would poll. The
operator believes a pod only when its controller ownerReference is the trainer Job this attempt created
(that Job's uid), and a Job only when its controller ownerReference is the FineTuneJob (its uid); for a
JobSet, a pod whose controller is a Job whose controller is that JobSet. The
Job controller writes the first, the operator the second; neither can be set on another's object by a
tenant without the rights to that object's owner.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def controlled_by(obj: Mapping[str, Any], kind: str, uid: str | None) -> bool:
    """True when obj's controller ownerReference names an object of `kind` with this uid."""
    if not uid:
        return False
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(isinstance(ref, Mapping) and ref.get("controller") is True and ref.get("kind") == kind
               and ref.get("uid") == uid for ref in refs)


def trusted_pods(job: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    """The pods that the trainer Job `job` owns; none without a Job."""
    if job is None:
        return ()
    uid = (job.get("metadata") or {}).get("uid")
    return tuple(pod for pod in pods if controlled_by(pod, "Job", uid))


def trusted_job(job: Mapping[str, Any] | None, owner_uid: str | None) -> Mapping[str, Any] | None:
    """The trainer Job, if the FineTuneJob with owner_uid controls it; else None (a foreign object)."""
    return job if job is not None and controlled_by(job, "FineTuneJob", owner_uid) else None


def trusted_jobset_pods(jobset: Mapping[str, Any] | None, jobs: Iterable[Mapping[str, Any]],
                        pods: Iterable[Mapping[str, Any]]) -> tuple[Mapping[str, Any], ...]:
    """The pods of a trainer JobSet: those whose controller is one of the Jobs that the JobSet controls."""
    if jobset is None:
        return ()
    uid = (jobset.get("metadata") or {}).get("uid")
    owned = {(job.get("metadata") or {}).get("uid") for job in jobs if controlled_by(job, "JobSet", uid)}
    return tuple(pod for pod in pods if any(controlled_by(pod, "Job", job_uid) for job_uid in owned))
