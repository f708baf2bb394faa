"""The self-serve REST API: platform teams create, watch and stop FineTuneJobs over HTTP.

It is a thin gateway in front of the Kubernetes API: every FineTuneJob is the same custom resource
`kubectl apply` creates, validated by the same spec model and planned by the same planner before it
is stored, so a bad request never reaches the cluster and the caller sees the plan at once.

Who may do what stays with Kubernetes RBAC, in either mode (see auth.py and docs/security.md):
passthrough (default) forwards the caller's bearer token; serviceaccount acts with the API pod's own
token after a TokenReview and a SubjectAccessReview of the caller.

    kubetune api --port 8000          # OpenAPI docs at /docs
"""

from kubetune.api.app import create_app, run_api, summarize
from kubetune.api.settings import ApiSettings

__all__ = ["ApiSettings", "create_app", "run_api", "summarize"]
