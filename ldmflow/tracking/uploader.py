"""A background uploader for a run's metrics, params, tags and preview images, so training never waits on MLflow.

Values are buffered in memory and sent with `MlflowClient.log_batch` (one request for everything pending, up to
MLflow's per-request limits). When the store is unreachable the uploader keeps the values, warns once, and
retries with exponential backoff; whatever is still pending when the run closes is handed back to the caller.
One thread per run; the training loop only appends to lists under a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MAX_PARAMS_TAGS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_ENTITIES_PER_BATCH = 1000
MAX_QUEUED_IMAGES = 16
# Errors that retrying cannot fix (bad key, deleted run...): the batch is dropped with a warning.
_PERMANENT_ERROR_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST",
                          "PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_ALREADY_EXISTS"}


@dataclass
class Pending:
    """What has not reached MLflow (yet): mlflow.entities Metric / Param / RunTag lists and queued images."""

    metrics: list = field(default_factory=list)
    params: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    images: deque = field(default_factory=deque)  # (PIL image, key, step)

    def has_scalars(self) -> bool:
        return bool(self.metrics or self.params or self.tags)

    def __bool__(self) -> bool:
        return self.has_scalars() or bool(self.images)


def is_permanent(error: Exception) -> bool:
    """True for MLflow errors a retry cannot fix (as opposed to a server that is down or overloaded)."""
    return getattr(error, "error_code", None) in _PERMANENT_ERROR_CODES


class BatchUploader:
    """Owns the pending values of one run and the thread that sends them."""

    def __init__(self, client, run_id: str, first_backoff: float = 2.0, max_backoff: float = 120.0):
        self._client, self._run_id = client, run_id
        self._first_backoff, self._max_backoff = first_backoff, max_backoff
        self._cond = threading.Condition()
        self._pending = Pending()
        self._retry_at = 0.0
        self._backoff = first_backoff
        self._outage_since: float | None = None
        self._attempts = 0
        self._closing = False
        self._gave_up = False
        self._dropped_images = 0
        self._thread = threading.Thread(target=self._run, name=f"ldmflow-mlflow-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def in_outage(self) -> bool:
        """True from a failed upload until the next successful one (values are pending and retried meanwhile)."""
        return self._outage_since is not None

    def add(self, metrics=(), params=(), tags=()) -> None:
        with self._cond:
            self._pending.metrics.extend(metrics)
            self._pending.params.extend(params)
            self._pending.tags.extend(tags)
            self._cond.notify_all()

    def add_image(self, image, key: str, step: int) -> None:
        """Queue a preview image; the oldest is dropped when the queue is full (they are also on disk)."""
        with self._cond:
            if len(self._pending.images) >= MAX_QUEUED_IMAGES:
                self._pending.images.popleft()
                self._dropped_images += 1
                if self._dropped_images == 1:
                    logger.warning("MLflow image queue full: dropping the oldest preview images "
                                   "(they are still in the output folder).")
            self._pending.images.append((image, key, step))
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything now (skipping any backoff wait); False if an attempt failed or time ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._retry_at = 0.0
            attempts = self._attempts
            self._cond.notify_all()
            while self._pending and not self._gave_up:
                if self.in_outage and self._attempts > attempts:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._pending

    def close(self, timeout: float = 60.0) -> Pending:
        """One last attempt, then stop the thread; returns what could not be sent."""
        with self._cond:
            self._closing = True
            self._retry_at = 0.0
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            left = Pending(list(self._pending.metrics), list(self._pending.params), list(self._pending.tags),
                           deque(self._pending.images))
            self._pending = Pending()
        return left

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    if self._closing and (not self._pending or self._gave_up):
                        return
                    wait = None if not self._pending else max(self._retry_at - time.monotonic(), 0.01)
                    self._cond.wait(wait)
                work = self._take()
            error = self._send(work)
            with self._cond:
                self._record(work, error)
                self._cond.notify_all()

    def _due(self) -> bool:
        return bool(self._pending) and not self._gave_up and time.monotonic() >= self._retry_at

    def _take(self) -> tuple:
        """The next request: a batch of scalars (params and tags first) or, when none are left, one image."""
        pending = self._pending
        if not pending.has_scalars():
            return ("image", pending.images[0])
        params = pending.params[:MAX_PARAMS_TAGS_PER_BATCH]
        tags = pending.tags[:MAX_PARAMS_TAGS_PER_BATCH]
        metrics = pending.metrics[:MAX_ENTITIES_PER_BATCH - len(params) - len(tags)]
        return ("batch", metrics, params, tags)

    def _send(self, work: tuple) -> Exception | None:
        try:
            if work[0] == "image":
                image, key, step = work[1]
                self._client.log_image(self._run_id, image, key=key, step=step, synchronous=True)
            else:
                _, metrics, params, tags = work
                self._client.log_batch(self._run_id, metrics=metrics, params=params, tags=tags, synchronous=True)
        except Exception as error:  # noqa: BLE001 - any failure must leave training running
            return error
        return None

    def _record(self, work: tuple, error: Exception | None) -> None:
        self._attempts += 1
        if error is None or is_permanent(error):
            if error is not None:
                logger.warning("MLflow rejected %s; dropped: %s", _describe(work), error)
            self._remove(work)
            self._leave_outage()
            return
        self._enter_outage(error, _describe(work))
        if self._closing:
            self._gave_up = True
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)

    def _remove(self, work: tuple) -> None:
        if work[0] == "image":
            self._pending.images.popleft()
            return
        _, metrics, params, tags = work
        del self._pending.metrics[:len(metrics)]
        del self._pending.params[:len(params)]
        del self._pending.tags[:len(tags)]

    def _enter_outage(self, error: Exception, what: str) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning("MLflow is unreachable (%s failed: %s). Training goes on; metrics are kept in memory "
                           "and retried in the background.", what, _short(error))

    def _leave_outage(self) -> None:
        if self._outage_since is not None:
            logger.warning("MLflow is reachable again after %.0f s; uploading the buffered values.",
                           time.monotonic() - self._outage_since)
            self._outage_since = None
        self._backoff = self._first_backoff


def _describe(work: tuple) -> str:
    if work[0] == "image":
        return f"image {work[1][1]!r} (step {work[1][2]})"
    _, metrics, params, tags = work
    return f"a batch of {len(metrics)} metrics, {len(params)} params and {len(tags)} tags"


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
