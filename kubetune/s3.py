"""S3 access the core needs without the trainer: a boto3 client (imported lazily, with a clear error when the
package is missing) and the planner's reader of a model's config.json under an s3:// prefix.

The endpoint and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as for every
AWS SDK; the operator, the REST API and `kubetune plan` read `s3://` model sources with them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from kubetune.errors import SpecError


def s3_client(endpoint_url: str | None = None) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise SpecError("s3:// needs boto3, which is not installed here: pip install 'kubetune[operator]' (or "
                        "[trainer]), or use a hub id or a local path") from None
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                    s3={"addressing_style": "path"} if endpoint else None)
    return boto3.client("s3", endpoint_url=endpoint, config=config,
                        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix/ -> ("bucket", "some/prefix")."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def read_s3_config(uri: str) -> dict[str, Any] | None:
    """config.json under an s3:// model prefix (the planner's architecture reader), or None when it is not
    there or not readable (the planner then says which model it does not know)."""
    client = s3_client()
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_uri(uri)
    key = f"{prefix}/config.json" if prefix else "config.json"
    try:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError):
        return None
    try:
        config = json.loads(data)
    except ValueError:
        return None
    return config if isinstance(config, dict) else None
