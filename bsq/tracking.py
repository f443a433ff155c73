"""MLflow tracking for stage jobs: one run per job, flattened config params, lineage tags, safe parallel writers.

Why a file lock: several Snakemake jobs log to one local SQLite store at once. Creating a fresh SQLite store from
two processes corrupts it for good (an upstream race), and concurrent writers can fail with "database is locked".
So for `sqlite:` URIs every operation that touches the store (creation, migration, experiment get-or-create and
each write) holds an exclusive `flock` on `<db>.lock`; writes are few (per epoch), so the cost is negligible.
`flock` is not reliable on NFS/Lustre: on a cluster, point `tracking.uri` / MLFLOW_TRACKING_URI at an
`mlflow server` (writes then go over HTTP and take no lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from bsq.errors import BSQError
from bsq.signals import critical

__all__ = [
    "PARENT_ENV",
    "default_tracking_uri",
    "flatten",
    "flatten_params",
    "config_hash",
    "git_commit",
    "Tracker",
    "check_tracking_uri",
    "invocation_parent",
    "start_invocation_run",
    "end_invocation_run",
]

MAX_PARAM_LENGTH = 6000  # MLflow 3's limit on a param value
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")
RETRIES = 6
# The MLflow run of the current workflow invocation: the Snakefile's onstart handler creates it and exports its id
# here; every job run started with this variable set becomes its direct child (lineage lives in tags, not nesting).
PARENT_ENV = "BSQ_PARENT_RUN_ID"
DESCRIPTION_TAG = "mlflow.note.content"  # the run page's Description


def default_tracking_uri(results_dir: str | Path = "results") -> str:
    """MLFLOW_TRACKING_URI when set, else a local SQLite store under `<results_dir>/mlflow/` (no server needed)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(results_dir) / 'mlflow' / 'mlflow.db').resolve()}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}: dotted keys, values as they are (an empty mapping is a value)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flatten_params(config: Mapping[str, Any]) -> dict[str, str]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": "0.1"}; lists as JSON, None as "None", long values truncated."""
    out: dict[str, str] = {}
    for name, value in flatten(config).items():
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple, Mapping)) else str(value)
        out[name] = text[:MAX_PARAM_LENGTH]
    return out


def config_hash(config: Mapping[str, Any]) -> str:
    """12 hex chars identifying a config's content (key order does not matter)."""
    canonical = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def git_commit(path: str | Path | None = None) -> str | None:
    """HEAD of the git checkout holding `path` (default: this package), or None outside a checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:"):
        return None
    path = uri.split(":///", 1)[1] if ":///" in uri else ""
    if not path or path == ":memory:":
        raise BSQError(f"tracking URI {uri!r}: use sqlite:////absolute/path/mlflow.db for a local store")
    return Path(path)


def _is_locked_error(exc: BaseException) -> bool:
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


class _Store:
    """One MLflow store: its client, every write under the store's file lock (local SQLite) and retried while
    SQLite reports itself locked."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.db = _sqlite_path(uri)
        if self.db is not None:
            try:
                self.db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self.error(exc) from exc

    def error(self, exc: BaseException) -> BSQError:
        return BSQError(
            f"cannot open the MLflow store {self.uri!r}: {exc}. Set tracking.uri (or MLFLOW_TRACKING_URI) to a "
            "writable sqlite:////abs/path/mlflow.db or an http(s) server, or set tracking.enabled: false."
        )

    def open(self, experiment: str) -> str:
        """Connect (creating or migrating a SQLite store under the lock) and get or create `experiment`: its id."""
        try:
            with self.locked():
                self.connect()
                return self._experiment(experiment)
        except BSQError:
            raise
        except Exception as exc:  # mlflow raises many types for a bad store
            raise self.error(exc) from exc

    def connect(self):
        """The store's MLflow client (created here, once per `_Store`)."""
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self.db is None:
            yield
            return
        with open(f"{self.db}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write(self, fn, *args, **kwargs):
        """Call `fn` under the lock, retrying the transient "database is locked" of SQLite."""
        for attempt in range(RETRIES):
            try:
                with critical(), self.locked():  # a stop signal waits until the record is written
                    return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == RETRIES - 1 or not _is_locked_error(exc):
                    raise
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                raise BSQError(
                    f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) or set "
                    "tracking.experiment to another name"
                )
            return found.experiment_id
        location = None
        if self.db is not None:
            location = (self.db.parent / "artifacts" / name).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location, tags={"project": "bsq-repro"})


class Tracker:
    """One MLflow run for one stage job; a context manager that ends the run FINISHED, FAILED on an exception or
    KILLED on KeyboardInterrupt or a stop signal (the exception propagates; its text becomes the run's
    `bsq.failure` tag). `enabled=False` makes every method a no-op."""

    def __init__(
        self,
        experiment: str,
        run_name: str,
        *,
        uri: str | None = None,
        tags: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
        description: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri = uri or default_tracking_uri()
        self._finished = False
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        self._store = _Store(self.uri)
        self.experiment_id = self._store.open(experiment)
        self.client, self._write = self._store.client, self._store.write
        commit = git_commit()
        all_tags = {**(tags or {})}
        if commit:
            all_tags.setdefault("bsq.git_commit", commit)
            all_tags.setdefault("mlflow.source.git.commit", commit)
        if description:
            all_tags[DESCRIPTION_TAG] = description
        parent_run_id = self._parent_here(parent_run_id)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if resume_run_id:
            self._reopen(resume_run_id)
            kept = self.client.get_run(self.run_id).data.tags.get("mlflow.parentRunId")
            if kept and parent_run_id and kept != parent_run_id:  # the run stays a child of the invocation that
                all_tags["mlflow.parentRunId"] = kept  # started it; the one that finished it is a tag
                all_tags["bsq.resumed_in_run_id"] = parent_run_id
        else:
            run = self._write(self.client.create_run, self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id
        self.set_tags(all_tags)
        if params:
            self._log_params(flatten_params(params))

    def _parent_here(self, run_id: str | None) -> str | None:
        """`run_id` when it is a run of this experiment in this store, else None with a warning (a stale
        $BSQ_PARENT_RUN_ID, another store): the UI nests a child only under a parent of its own experiment."""
        if not run_id:
            return None
        try:
            found = self.client.get_run(run_id).info.experiment_id
        except Exception:  # not in this store
            found = None
        if found != self.experiment_id:
            import logging

            logging.getLogger("bsq").warning(
                "parent MLflow run %s is not a run of this experiment in %s: this run gets no parent", run_id, self.uri
            )
            return None
        return run_id

    def _reopen(self, run_id: str) -> None:
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            raise BSQError(
                f"cannot resume MLflow run {run_id}: {exc}. Delete the stage's .resume.pt file to start over"
            ) from exc
        self.run_id = run.info.run_id
        self._write(self.client.update_run, run_id, status="RUNNING")

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        for key, value in params.items():
            if key in existing and existing[key] != value:
                raise BSQError(
                    f"MLflow run {self.run_id} already has param {key}={existing[key]!r}, not {value!r}: a resumed "
                    "run must use the same config (delete the stage's .resume.pt file to start over)"
                )
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(new), 100):
            self._write(self.client.log_batch, self.run_id, params=new[start : start + 100])

    # ---- public API ------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_METRIC_NAME.sub("_", key), float(value), now, step or 0)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        for start in range(0, len(batch), 1000):
            self._write(self.client.log_batch, self.run_id, metrics=batch[start : start + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        self._write(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(
        self, name: str, source: str, digest: str, context: str, tags: Mapping[str, str] | None = None
    ) -> None:
        """The run's dataset input (the UI's Datasets column): a metadata-only dataset (name, source URI, digest),
        `context` (train, test) and `tags` as its input tags. Logging the same input again is a no-op."""
        if not self.enabled:
            return
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        dataset = MetaDataset(_dataset_source(source), name=name, digest=digest)
        input_tags = [InputTag("mlflow.data.context", context)] + [InputTag(k, str(v)) for k, v in (tags or {}).items()]
        existing = self.client.get_run(self.run_id).inputs.dataset_inputs
        if any(
            d.dataset.name == name and d.dataset.digest == digest and context in {t.value for t in d.tags}
            for d in existing
        ):
            return
        self._write(self.client.log_inputs, self.run_id, [DatasetInput(dataset._to_mlflow_entity(), input_tags)])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self._write(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self._write(self.client.log_dict, self.run_id, dict(data), artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled or self._finished:
            return
        self._finished = True
        self._write(self.client.set_terminated, self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def close_stale(self, run_ids: Iterable[str | None], why: str) -> list[str]:
        """End as KILLED the runs a dead process left RUNNING (found through its folder lock or resume file);
        returns the ids it closed. Runs that ended, or that this tracker continues, are left alone."""
        closed = []
        for run_id in {r for r in run_ids if r and r != self.run_id} if self.enabled else ():
            try:
                status = self.client.get_run(run_id).info.status
            except Exception:  # deleted, or from another store: nothing to close here
                continue
            if status == "RUNNING":
                self._write(self.client.set_tag, run_id, "bsq.failure", why)
                self._write(self.client.set_terminated, run_id, "KILLED")
                closed.append(run_id)
        return closed

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
            return False
        try:
            with contextlib.suppress(Exception):  # never hide the original error behind a tracking one
                self.set_tags({"bsq.failure": f"{exc_type.__name__}: {exc}"[:MAX_PARAM_LENGTH]})
        finally:  # even when a stop signal held during that write is raised now: never leave the run RUNNING
            with contextlib.suppress(Exception):
                self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


def _dataset_source(uri: str):
    """file:// and local paths: a local source; http(s): an HTTP source (no lookup, no download)."""
    if uri.startswith(("http://", "https://")):
        from mlflow.data.http_dataset_source import HTTPDatasetSource

        return HTTPDatasetSource(uri)
    from mlflow.data.sources import LocalArtifactDatasetSource

    return LocalArtifactDatasetSource(uri)


# ---- the run of one workflow invocation ------------------------------------------------------------------------
def invocation_parent() -> str | None:
    """The id of the current workflow invocation's run ($BSQ_PARENT_RUN_ID), or None (a CLI job on its own)."""
    return os.environ.get(PARENT_ENV) or None


def start_invocation_run(
    experiment: str, config: Mapping[str, Any], uri: str | None = None, description: str | None = None
) -> str:
    """Create the run of one workflow invocation (name: the config's `name` and its content hash), the parent of
    every job run; returns its id. Creating it also creates the store and the experiment once, before parallel jobs
    start (creating a fresh SQLite store from several processes at once corrupts it). Torch-free."""
    name = str(config.get("name", experiment))
    digest = config_hash(config)
    tracker = Tracker(
        experiment,
        f"{name} · {digest[:7]}",
        uri=uri,
        tags={"bsq.stage": "workflow", "bsq.config_hash": digest, "bsq.config_name": name},
        params={
            k: config[k] for k in ("name", "dataset", "arch", "methods", "alphas", "seeds", "preset") if k in config
        },
        description=description,
    )
    tracker.log_dict(json.loads(json.dumps(dict(config), default=str)), "workflow_config.json")
    return tracker.run_id  # left RUNNING: end_invocation_run ends it


def end_invocation_run(run_id: str | None, status: str = "FINISHED", uri: str | None = None) -> None:
    """End the invocation's run (FINISHED after the workflow succeeded, FAILED after a failed job)."""
    if not run_id:
        return
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    store = _Store(uri or default_tracking_uri())
    store.write(store.connect().set_terminated, run_id, status)


# ---- fail fast on a tracking store that cannot work ----------------------------------------------------------------
_TRACKING_FIX = (
    "Start it (`mlflow server --host 127.0.0.1 --port 5000`), fix mlflow_uri / tracking.uri / MLFLOW_TRACKING_URI, "
    "or set mlflow: false"
)
_SERVER_PROBES = ("/health", "/api/2.0/mlflow/experiments/search?max_results=1")


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Refuse a tracking store that cannot work before any job or run starts: MLflow's client retries an unreachable
    server for minutes per job before it fails. http(s): one GET of the server's /health (then of its experiments
    API), no retries; sqlite: the store's folder can be created and written (nothing is created here). Other schemes
    (file:, databricks, ...) are left to MLflow."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme in ("http", "https"):
        _check_tracking_server(uri, timeout)
    elif scheme == "sqlite":
        _check_sqlite_store(uri)


def _without_credentials(uri: str) -> str:
    """The URI without user:password@ (never printed, and urllib cannot send it)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _check_tracking_server(uri: str, timeout: float) -> None:
    import http.client
    import urllib.error
    import urllib.request

    base = _without_credentials(uri).rstrip("/")
    answers = []
    for probe in _SERVER_PROBES:
        try:
            with urllib.request.urlopen(base + probe, timeout=timeout):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # a server that wants credentials: MLflow's client sends them
                return
            answers.append(f"HTTP {exc.code} from {probe.split('?')[0]}")
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, unknown host, timeout, bad URL
            reason = getattr(exc, "reason", None) or exc
            raise BSQError(f"cannot reach the MLflow tracking server at {base} ({reason}). {_TRACKING_FIX}") from None
    raise BSQError(
        f"cannot reach the MLflow tracking server at {base} ({'; '.join(answers)}: is it an MLflow server?). "
        f"{_TRACKING_FIX}"
    )


def _check_sqlite_store(uri: str) -> None:
    path = uri.removeprefix("sqlite:///").split("?")[0] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return
    db = Path(path).absolute()
    existing = next(p for p in (db.parent, *db.parent.parents) if p.exists())
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"cannot create files in {existing}"
    elif db.exists() and not os.access(db, os.W_OK):
        problem = f"{db} is read-only"
    else:
        return
    raise BSQError(
        f"cannot use the MLflow SQLite store at {uri} ({problem}). Point mlflow_uri / tracking.uri / "
        "MLFLOW_TRACKING_URI at a folder you can write, or set mlflow: false"
    )
