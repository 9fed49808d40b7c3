"""What a training or sampling run logs to MLflow, and the run's lifetime (`open_run`).

Only the main process of a multi-process run talks to MLflow; every other process (and `--no_mlflow`) gets a
`NullTracker`. Metrics, params, tags and preview images go through a background uploader, so a tracking server
that goes down never stops or slows training: values are buffered and retried, and what is still unsent when
the run ends is written to `<output_dir>/mlflow_pending_metrics.jsonl` (tracking/pending.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import secrets
import shlex
import time
import warnings
from pathlib import Path

from ldmflow.environment import environment_tags
from ldmflow.errors import LdmflowError, Stopped, error_summary, traceback_file
from ldmflow.tracking.pending import PENDING_FILE, write_pending, write_pending_status
from ldmflow.tags import (DATASET_DIGEST_TAG, DIGEST_INPUT_TAG, ERROR_TAG, PARENT_RUN_TAG, RESUMED_BY_RUN_TAG,
                          RUN_NAME_TAG, SPLIT_INPUT_TAG, STAGE_TAG)

logger = logging.getLogger(__name__)

UI_HINT_SHOWN_ENV = "LDMFLOW_UI_HINT_SHOWN"  # set once a local store's `mlflow ui` command was printed
UI_MODE = "workflowType=machine_learning"  # MLflow 3's UI opens experiments in its GenAI mode otherwise
ERROR_ARTIFACT_PATH = "error"  # a run failed by an unexpected error: its traceback file, under this folder
_KEY_RE = re.compile(r"^[/\w.\- :]{1,250}$")
_MAX_PARAM_LENGTH = 6000
_MAX_TAG_LENGTH = 8000
_MAX_DIGEST_LENGTH = 36  # MLflow's dataset digest column


def valid_key(key: str) -> bool:
    """MLflow's rule for metric/param names, checked here so one bad key cannot get a whole batch rejected."""
    return bool(_KEY_RE.match(key)) and posixpath.normpath(key) == key and not key.startswith(("/", ".."))


class NullTracker:
    """The tracker of `--no_mlflow` runs and non-main processes: accepts every call and does nothing."""

    run_id = None
    last_step = 0

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, image, key: str, step: int) -> None: ...
    def log_dict(self, obj, artifact_file: str) -> bool: return False
    def log_artifacts(self, local_dir, artifact_path: str | None = None) -> bool: return False
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, local_path, artifact_path: str | None = None) -> bool: return False
    def log_dataset(self, manifest_path, digest: str, split: str, num_records: int, name: str,
                    tag_digest: bool = True) -> bool: return False
    def flush(self, timeout: float | None = None) -> bool: return True
    def close(self) -> None: ...


def _same_param(logged: str, value: str) -> bool:
    """Whether a param already in the run says `value`: MLflow Projects logs each `-P` value shell-quoted (`''`
    for an empty one, `'a b'`), and a number may be spelled another way (`1e-4` for `0.0001`)."""
    if logged in (value, shlex.quote(value)):
        return True
    try:
        return float(logged) == float(value)
    except ValueError:
        return False


class RunTracker:
    """Logs to one MLflow run; every method returns quickly and never raises on a tracking outage."""

    def __init__(self, run_id: str, output_dir: str | Path | None = None, client=None,
                 first_backoff: float = 2.0, close_timeout: float = 60.0):
        from mlflow import MlflowClient

        from ldmflow.tracking.uploader import BatchUploader

        self._client = client or MlflowClient()
        self._run_id = run_id
        self._output_dir = Path(output_dir) if output_dir else Path.cwd()
        self._known_params = dict(self._client.get_run(run_id).data.params)
        self._uploader = BatchUploader(self._client, run_id, first_backoff=first_backoff)
        self._close_timeout = close_timeout
        self._bad_keys: set[str] = set()
        self._closed = False
        self.last_step = 0

    @property
    def run_id(self) -> str:
        return self._run_id

    @property
    def in_outage(self) -> bool:
        return self._uploader.in_outage

    def log_params(self, params: dict[str, str]) -> None:
        """Log params not yet in the run; a key already there (e.g. an `mlflow run -P` value) is kept as is."""
        from mlflow.entities import Param

        new = []
        for key, value in params.items():
            value = "" if value is None else str(value)
            if key in self._known_params:
                if not _same_param(self._known_params[key], value):
                    logger.warning("MLflow param %r is already %r in this run (e.g. from `mlflow run -P`); "
                                   "keeping it, although this run uses %r.", key, self._known_params[key], value)
                continue
            if self._check_key(key, "param"):
                self._known_params[key] = value
                new.append(Param(key, value[:_MAX_PARAM_LENGTH]))
        self._uploader.add(params=new)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer metrics for the next batch upload (one request however many keys)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                self._reject(key, "metric", f"its value {value!r} is not a number")
                continue
            if self._check_key(key, "metric"):
                batch.append(Metric(key, value, timestamp, int(step)))
        self.last_step = max(self.last_step, int(step))
        self._uploader.add(metrics=batch)

    def log_image(self, image, key: str, step: int) -> None:
        """A step-indexed image (MLflow's image view); uploaded in the background from a copy."""
        key = re.sub(r"[^a-zA-Z0-9_\-./ ]", "_", key) or "image"
        self._uploader.add_image(image.copy(), key, int(step))

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._uploader.add(tags=[RunTag(str(k), "" if v is None else str(v)[:_MAX_TAG_LENGTH])
                                 for k, v in tags.items() if self._check_key(str(k), "tag")])

    def log_dict(self, obj, artifact_file: str) -> bool:
        return self._upload(lambda: self._client.log_dict(self._run_id, obj, artifact_file), artifact_file)

    def log_artifacts(self, local_dir, artifact_path: str | None = None) -> bool:
        return self._upload(lambda: self._client.log_artifacts(self._run_id, str(local_dir), artifact_path),
                            f"folder {local_dir}")

    def log_artifact(self, local_path, artifact_path: str | None = None) -> bool:
        return self._upload(lambda: self._client.log_artifact(self._run_id, str(local_path), artifact_path),
                            f"file {local_path}")

    def log_dataset(self, manifest_path, digest: str, split: str, num_records: int, name: str,
                    tag_digest: bool = True) -> bool:
        """The manifest (or a latent cache of it) as an MLflow dataset input (context "training"), findable by
        its digest; `tag_digest`: also the run's dataset_digest tag (the manifest's, not a cache's)."""
        dataset = manifest_dataset(manifest_path, digest, split, num_records, name)
        if tag_digest:
            self.set_tags({DATASET_DIGEST_TAG: digest})

        def upload():
            from mlflow.entities import DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training"), InputTag(SPLIT_INPUT_TAG, split),
                    InputTag(DIGEST_INPUT_TAG, digest)]
            self._client.log_inputs(self._run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])

        return self._upload(upload, f"dataset {name!r}")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything buffered is uploaded; False when MLflow is unreachable or time ran out."""
        return self._uploader.flush(timeout)

    def wait_for_store(self, seconds: float) -> None:
        """At the end of training: return once everything buffered reached MLflow and its server answers. If it
        stays unreachable for `seconds`, stop waiting for it (the rest goes to the pending file when the run
        closes) and raise."""
        from ldmflow.tracking.store import RETRY_SECONDS_ENV, server_answers, stop_waiting_for_server

        deadline = time.monotonic() + seconds
        while not (self._uploader.flush(max(deadline - time.monotonic(), 0.0)) and server_answers()):
            if time.monotonic() >= deadline:
                stop_waiting_for_server()
                raise LdmflowError(
                    f"MLflow stayed unreachable for {seconds:.0f} s after training ({RETRY_SECONDS_ENV}), so the "
                    f"model was not registered. The weights are in {self._output_dir}; the run's end and any "
                    f"values not uploaded are in {self._output_dir / PENDING_FILE} (upload them with "
                    "ldmflow.tracking.pending.replay_pending).")
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))

    def close(self) -> None:
        """Last upload attempt; whatever is still pending goes to `<output_dir>/mlflow_pending_metrics.jsonl`."""
        if self._closed:
            return
        self._closed = True
        left = self._uploader.close(self._close_timeout)
        if left.images:
            logger.warning("%d preview image(s) were not uploaded to MLflow (they are in %s).",
                           len(left.images), self._output_dir)
        if left.has_scalars():
            path = write_pending(self._output_dir / PENDING_FILE, self._run_id, left)
            logger.warning("MLflow was unreachable at the end of the run: %d metric values, %d params and %d tags "
                           "were written to %s. Upload them later with "
                           "ldmflow.tracking.pending.replay_pending(%r, %r).",
                           len(left.metrics), len(left.params), len(left.tags), path, str(path), self._run_id)

    def write_pending_status(self, status: str) -> None:
        """Record the final status that could not be set, so `replay_pending` ends the run properly."""
        path = write_pending_status(self._output_dir / PENDING_FILE, self._run_id, status)
        logger.warning("The run's final status %s is recorded in %s for replay_pending.", status, path)

    def _check_key(self, key: str, kind: str) -> bool:
        if valid_key(key):
            return True
        self._reject(key, kind, "MLflow names may only contain letters, digits, _ - . : / and spaces")
        return False

    def _reject(self, key: str, kind: str, reason: str) -> None:
        """Warn once per key: a bad key is a bug to fix, but never a reason to stop training."""
        if key not in self._bad_keys:
            self._bad_keys.add(key)
            logger.warning("Not logging %s %r: %s.", kind, key, reason)

    def _upload(self, upload, what: str) -> bool:
        """A synchronous upload; skipped during a known outage, a warning (never an exception) on failure."""
        if self._uploader.in_outage:
            logger.warning("MLflow is unreachable: not uploading %s.", what)
            return False
        try:
            upload()
        except Exception as error:  # noqa: BLE001 - tracking must not stop training
            logger.warning("Could not upload %s to MLflow: %s", what, str(error).splitlines()[0][:300])
            return False
        return True


def manifest_dataset(manifest_path, digest: str, split: str, num_records: int, name: str):
    """An MLflow MetaDataset for a manifest split, with its size and split as the profile."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class ManifestDataset(MetaDataset):
        @property
        def profile(self):
            return {"num_records": int(num_records), "split": split, "full_digest": digest}

        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    with warnings.catch_warnings():  # a local path matches two equivalent source types; either is fine
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(manifest_path).absolute()))
    return ManifestDataset(source, name=name, digest=digest[:_MAX_DIGEST_LENGTH])


@contextlib.contextmanager
def open_run(settings, stage: str, enabled: bool = True, parent_run_id: str | None = None,
             run_id: str | None = None):
    """A RunTracker for the run of this process (`run_id` when given: a sweep's trial run, which this process then
    ends; `MLFLOW_RUN_ID` under `mlflow run`; else a new run in `settings.experiment_name`, or nested under
    `parent_run_id` in that run's experiment), or a NullTracker when disabled. Logs `settings.to_params()`, the
    stage tag and the environment's tags (ldmflow/environment.py), records system metrics, and ends the run
    FINISHED, FAILED (exception) or KILLED (Ctrl-C)."""
    if not enabled:
        yield NullTracker()
        return
    given, (run_id, owned) = run_id, _start_run(settings, stage, parent_run_id, run_id)
    status, tracker = "FINISHED", None
    try:
        tracker = RunTracker(run_id, output_dir=getattr(settings, "output_dir", None))
        tracker.log_params(settings.to_params())
        tracker.set_tags({STAGE_TAG: stage, **environment_tags()})
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as error:
        status = "FAILED"
        if tracker is not None and not isinstance(error, Stopped):
            _record_failure(tracker.set_tags, tracker.log_artifact, error, getattr(settings, "output_dir", None))
        raise
    finally:  # the run never stays RUNNING, and an error in RunTracker() itself is not masked
        if tracker is not None:
            tracker.close()
        if given:  # a sweep's trial: its study sets the final status (FINISHED, KILLED when pruned, FAILED)
            status = "RUNNING"
        if owned and not _end_run(run_id, status) and tracker is not None:
            tracker.write_pending_status(status)


def _record_failure(set_tags, log_artifact, error: BaseException, output_dir) -> None:
    """The error that failed the run as its `ldmflow.error` tag; an unexpected one's traceback file (the one the
    CLI names) as an artifact too. Never raises: the original error is what the user must see."""
    try:
        set_tags({ERROR_TAG: error_summary(error)})
        if not isinstance(error, LdmflowError):
            path = traceback_file(error, output_dir)
            if path is not None:
                log_artifact(path, ERROR_ARTIFACT_PATH)
    except Exception as problem:  # noqa: BLE001
        logger.warning("Could not record the error on the MLflow run: %s", str(problem).splitlines()[0][:300])


@contextlib.contextmanager
def outside_the_project_run():
    """Yields the run `mlflow run` started for this process (None without one) with MLFLOW_RUN_ID unset
    meanwhile, so that a run opened now (a probe trained for an evaluation, a replicate) gets a run of its own,
    nested under that one by its parent_run_id, instead of attaching to it. The variable stays: it is how
    `mlflow run` hands its run across the process boundary, and MLflow's own start_run reads it."""
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield saved
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


@contextlib.contextmanager
def recording_failure(run_id: str, output_dir=None):
    """For a run that is not opened with open_run (the pipeline's parent run): an error inside it is recorded
    the same way, before the run's own context ends it FAILED; Ctrl-C or SIGTERM ends it KILLED."""
    try:
        yield
    except KeyboardInterrupt:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run("KILLED")  # before the run's context would end it FAILED
        raise
    except Exception as error:
        from mlflow import MlflowClient

        client = MlflowClient()
        _record_failure(lambda tags: [client.set_tag(run_id, key, value) for key, value in tags.items()],
                        lambda path, folder: client.log_artifact(run_id, str(path), folder), error, output_dir)
        raise


def close_abandoned_run(run_id: str, successor: str) -> bool:
    """When a resume takes over from `run_id`: link it to its successor, and mark it KILLED if a killed process
    (kill -9, a lost node) left it RUNNING. True if it was."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        client.set_tag(run_id, RESUMED_BY_RUN_TAG, successor)
        if run.info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            logger.info("Run %s was left RUNNING by a killed process: marked KILLED.", run_id)
            return True
    except MlflowException as error:  # another store, or deleted: the tags still say where this run came from
        logger.info("Could not update run %s: %s", run_id, str(error).splitlines()[0])
    return False


def default_run_name(stage: str, settings=None) -> str:
    """`vae-64px-3fa2`, `sample-g3-91c0`: the stage, its key setting, and a random suffix so every run's name
    differs (MLflow's own names come from the global `random`, which the trainers seed: every run of a seed
    would get the same one)."""
    key = ""
    if stage in ("sample", "evaluate") and getattr(settings, "guidance_scale", None) is not None:
        key = f"-g{settings.guidance_scale:g}"
    elif getattr(settings, "resolution", None):
        key = f"-{settings.resolution}px"
    return f"{stage}{key}-{secrets.token_hex(2)}"


MLFLOW_RANDOM_NAME = re.compile(r"^[a-z]+-[a-z]+-\d+$")  # what `mlflow run` names a run it starts


def _start_run(settings, stage: str, parent_run_id: str | None = None, given_run_id: str | None = None
               ) -> tuple[str, bool]:
    """(run id, whether this process started it and must end it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ldmflow.tracking.store import access_problem, check_server_reachable, ensure_experiment, use_tracking_store

    uri = use_tracking_store()
    check_server_reachable(uri)
    run_id = given_run_id or os.environ.get("MLFLOW_RUN_ID", "").strip()
    active = mlflow.active_run()
    if active is not None and run_id == active.info.run_id:
        return run_id, False  # already attached (e.g. by a driver process); its owner ends it
    try:
        if run_id:
            run = mlflow.start_run(run_id=run_id, nested=active is not None, log_system_metrics=True)
            if not getattr(settings, "run_name", None) and MLFLOW_RANDOM_NAME.match(run.info.run_name or ""):
                mlflow.set_tag(RUN_NAME_TAG, default_run_name(stage, settings))  # `mlflow run` named it
        else:  # a child run goes where its parent is: the UI nests runs within one experiment only
            experiment_id = mlflow.get_run(parent_run_id).info.experiment_id if parent_run_id else \
                ensure_experiment(settings.experiment_name)
            run = mlflow.start_run(experiment_id=experiment_id,
                                   run_name=getattr(settings, "run_name", None) or default_run_name(stage, settings),
                                   nested=active is not None, log_system_metrics=True,
                                   tags={STAGE_TAG: stage, **_parent_tag(parent_run_id)})
    except MlflowException as error:
        what = f"attach to run MLFLOW_RUN_ID={run_id}" if run_id else "start an MLflow run"
        reason = access_problem(error, f"log runs to experiment {settings.experiment_name!r}")
        raise LdmflowError(f"Cannot {what} in {uri}: {reason or str(error).splitlines()[0]}.") from None
    name = mlflow.get_run(run.info.run_id).info.run_name
    if uri.startswith(("http://", "https://")) or not os.environ.get(UI_HINT_SHOWN_ENV):
        logger.info("MLflow run %s (%s); watch it live: %s", run.info.run_id, name, run_location(uri, run))
        os.environ[UI_HINT_SHOWN_ENV] = "1"  # a local store's `mlflow ui` command: once per process tree
    else:
        logger.info("MLflow run %s (%s)", run.info.run_id, name)
    return run.info.run_id, True


def _parent_tag(parent_run_id: str | None) -> dict[str, str]:
    return {PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}


def run_location(uri: str, run) -> str:
    """The run's page in the MLflow UI for a server; for a local store, the command that serves the UI."""
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?{UI_MODE}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000/{page})"


def _end_run(run_id: str, status: str) -> bool:
    """End the run; on an outage, warn, stop its system-metrics thread and return False (it stays RUNNING)."""
    import mlflow

    try:
        mlflow.end_run(status)
        return True
    except Exception as error:  # noqa: BLE001
        logger.warning("Could not mark MLflow run %s as %s (%s); it shows as RUNNING until replayed.",
                       run_id, status, str(error).splitlines()[0][:300])
        monitors = getattr(mlflow.tracking.fluent, "run_id_to_system_metrics_monitor", {})
        monitor = monitors.pop(run_id, None)
        if monitor is not None:
            monitor.finish()
        return False

