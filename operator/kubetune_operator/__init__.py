"""The kubetune operator: kopf handlers that turn FineTuneJobs into GPU-placed trainer Jobs."""
