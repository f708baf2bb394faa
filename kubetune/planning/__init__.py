"""Pure decisions: model architecture -> VRAM estimate -> GPU class, count and knobs -> placement.

No network here: a model's config.json on the hub or in S3 is read by `kubetune.sources` (the CLI, the REST
API, the operator and `kubetune train` call it) and handed in as a reader; `models` itself reads only local
files (the catalog, a model directory, the Hugging Face cache)."""
