"""The check a cluster YAML gets before `ray up` / `kubectl apply`: no CAPITALISED placeholder of the
shipped files left in a value, and (for a cluster-launcher YAML) Ray's own schema accepts it. Ray's
schema alone passes a file whose region is still `AWS_REGION`; the cloud then fails minutes later,
after it may have started (and billed) the head node.

    problem = check_cluster_yaml("cluster/aws.yaml")   # None, or one sentence naming the keys
    python -m layerpar.cluster_utils check cluster/aws.yaml
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# Every placeholder the files in cluster/ use in a value (their header comments name them).
PLACEHOLDERS = frozenset({
    "AWS_REGION", "AWS_AVAILABILITY_ZONES", "AMI_ID",                       # aws.yaml
    "GCP_REGION", "GCP_ZONE", "GCP_PROJECT_ID", "DLVM_IMAGE_FAMILY",        # gcp.yaml
    "NAMESPACE", "REPO_ARCHIVE_URL",                                        # kuberay-rayjob.yaml
    "HEAD_IP", "WORKER_IP_1", "WORKER_IP_2", "SSH_USER",                    # local.yaml (comments)
})
WORD = re.compile(r"[A-Z][A-Z0-9_]*[A-Z0-9]")


def scalars(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, text) for every string value; a multi-line string that is itself a YAML mapping
    (a RayJob's runtimeEnvYAML) is walked as YAML, so that its comments do not count."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from scalars(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from scalars(value, f"{path}[{i}]")
    elif isinstance(node, str):
        if "\n" in node:
            try:
                inner = yaml.safe_load(node)
            except yaml.YAMLError:
                inner = None
            if isinstance(inner, dict):
                yield from scalars(inner, path)
                return
        yield path, node


def unfilled(doc: Any) -> list[tuple[str, str]]:
    """(key, placeholder) for every value that still holds one of PLACEHOLDERS."""
    return [(key, word) for key, text in scalars(doc) for word in WORD.findall(text)
            if word in PLACEHOLDERS]


def _schema_problem(doc: dict) -> str | None:
    """Ray's cluster-config schema, after the provider defaults are filled in (as `ray up` does)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        # Ray's cli_logger prints advice on file mounts to sys.stderr: noise in a check
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            validate_config(prepare_config(doc))
    except Exception as exc:  # noqa: BLE001 - jsonschema and Ray raise several types; report the text
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def check_cluster_yaml(path: str | Path) -> str | None:
    """None when the file is ready for `ray up` (or `kubectl apply`), else one sentence saying what
    to fix."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror or exc})"
    except yaml.YAMLError as exc:
        return f"{path}: not valid YAML ({str(exc).splitlines()[0]})"
    if not isinstance(doc, dict):
        return f"{path}: not a cluster config (expected a YAML mapping at the top)"
    left = unfilled(doc)
    if left:
        keys = ", ".join(f"{key} ({word})" for key, word in left)
        step = "`kubectl apply`" if "kind" in doc else "`ray up`"
        return (f"{path} still holds placeholders: {keys}; replace each with your value (the comment "
                f"above the key says what it wants) before {step}")
    if "provider" in doc and (problem := _schema_problem(doc)):
        return f"{path}: Ray's cluster-config schema rejects it: {problem}"
    return None
