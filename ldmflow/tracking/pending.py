"""The outage file: what a run could not send to MLflow when it ended (metrics, params, tags, its final status),
as JSON lines in `<output_dir>/mlflow_pending_metrics.jsonl`, and `replay_pending` that sends it later."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ldmflow.errors import LdmflowError

logger = logging.getLogger(__name__)
PENDING_FILE = "mlflow_pending_metrics.jsonl"


def write_pending(path: Path, run_id: str, pending) -> Path:
    """Append unsent values as JSON lines ({"kind": "metric"|"param"|"tag", ...}) tagged with their run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        for metric in pending.metrics:
            file.write(json.dumps({"kind": "metric", "run_id": run_id, "key": metric.key, "value": metric.value,
                                   "timestamp": metric.timestamp, "step": metric.step}) + "\n")
        for kind, items in (("param", pending.params), ("tag", pending.tags)):
            for item in items:
                file.write(json.dumps({"kind": kind, "run_id": run_id, "key": item.key, "value": item.value}) + "\n")
    return path


def replay_pending(path, run_id: str | None = None) -> int:
    """Upload a pending-metrics file to `run_id` (default: the run recorded in it); returns values sent.

    The file is renamed to `*.replayed` afterwards, so running this twice does not log twice.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from ldmflow.tracking.store import use_tracking_store

    path = Path(path)
    if not path.is_file():
        raise LdmflowError(f"Pending metrics file {path} does not exist.")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    client = MlflowClient(use_tracking_store())
    by_run: dict[str, list[dict]] = {}
    for record in records:
        by_run.setdefault(run_id or record["run_id"], []).append(record)
    sent = 0
    for target, items in by_run.items():
        known = _run_params(client, target)
        metrics = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
                   for r in items if r["kind"] == "metric"]
        params = [Param(r["key"], r["value"]) for r in items if r["kind"] == "param" and r["key"] not in known]
        tags = [RunTag(r["key"], r["value"]) for r in items if r["kind"] == "tag"]
        for start in range(0, len(metrics), 1000):
            client.log_batch(target, metrics=metrics[start:start + 1000])
        for start in range(0, max(len(params), len(tags)), 100):
            client.log_batch(target, params=params[start:start + 100], tags=tags[start:start + 100])
        for record in items:
            if record["kind"] == "status":
                client.set_terminated(target, record["status"])
        sent += len(metrics) + len(params) + len(tags)
    path.rename(path.with_name(path.name + ".replayed"))
    logger.info("Replayed %d values from %s.", sent, path)
    return sent


def _run_params(client, run_id: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_run(run_id).data.params)
    except MlflowException as error:
        raise LdmflowError(f"Run {run_id!r} not found in the MLflow store: {error}") from None


def write_pending_status(path: Path, run_id: str, status: str) -> Path:
    """Append the run's final status that could not be set, so `replay_pending` ends the run properly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps({"kind": "status", "run_id": run_id, "status": status}) + "\n")
    return path
