"""Experiment trackers behind one interface: metrics.jsonl always, TensorBoard, W&B, MLflow and trackio on request.

A tracker receives the records of metrics.jsonl (`{"split": "train", "step": 3, "epoch": 0.5, "loss": 0.69, ...}`)
and logs each finite number as `<split>/<name>` (`train/loss`, `eval/rewards/chosen`) at the record's step; a
table of a few rows (generated samples) with `log_table`, a health alert with `log_event`. Each tracker's library
is imported only when that tracker starts, so `--report-to` costs nothing for the trackers it does not name.

A resumed run logs again the steps between its checkpoint and the end of the run it continues: metrics.jsonl and
TensorBoard keep only the new values of those steps; MLflow and trackio keep both; W&B ignores a step at or below
the last one it holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import math
import netrc
import numbers
import os
import re
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

from dpo.errors import UserError, first_line
from dpo.files import write_text_atomically
from dpo.metrics import read_metrics
from dpo.settings import ConfigError

PROJECT = "dpo"  # W&B project (or WANDB_PROJECT), MLflow experiment (or MLFLOW_EXPERIMENT_NAME), trackio project

# The metrics TensorBoard's HParams dashboard shows beside each run's settings.
HPARAM_METRICS = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "train/loss")


class TrackerUnavailable(ConfigError):
    """`--report-to` names a tracker whose library is not installed."""


class TrackerError(UserError):
    """A tracker's library cannot start its run (a bad URI, a server down, a run id its store lacks): the run stops
    with one line before any work."""


class MetricsWriteError(UserError):
    """metrics.jsonl cannot be written (a full disk): the run stops with one line."""


@contextlib.contextmanager
def metrics_written(path: Path) -> Iterator[None]:
    """An OSError while `path` is written as a MetricsWriteError naming it."""
    try:
        yield
    except OSError as error:
        raise MetricsWriteError(f"{path} cannot be written ({first_line(error)})") from None


def is_metric(value: Any) -> bool:
    """A finite number; bools, strings and None are not metrics."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's metrics under tracker keys: `{"train/loss": 0.69, "train/epoch": 0.5, ...}`."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in ("split", "step") and is_metric(value)}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


class Tracker(ABC):
    """One experiment tracker; a new one is a subclass registered in TRACKERS."""

    name: ClassVar[str]
    extra: ClassVar[str | None] = None  # the setup.py extra that installs its library
    module: ClassVar[str | None] = None  # the library's import name

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int):
        self.run_dir = Path(run_dir)
        self.location = str(self.run_dir)  # where a user finds what this tracker logged

    @classmethod
    def installed(cls) -> bool:
        """Whether the tracker's library is installed (nothing is imported to find out)."""
        # find_spec imports nothing (trackio fixes its directory when imported); a None in sys.modules is missing
        try:
            return cls.module is None or importlib.util.find_spec(cls.module) is not None
        except (ImportError, ValueError):
            return False

    @classmethod
    def require(cls) -> None:
        """Raise TrackerUnavailable when the library is not installed."""
        if not cls.installed():
            raise TrackerUnavailable(f'--report-to {cls.name} needs the {cls.module} package: '
                                     f'pip install -e ".[{cls.extra}]"')

    @abstractmethod
    def log(self, record: dict[str, Any]) -> None:
        """Log one metrics.jsonl record at its step."""

    @abstractmethod
    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a small table (a few generated samples) under `name` at `step`."""

    @abstractmethod
    def log_event(self, step: int, name: str, message: str) -> None:
        """Log a health alert `name` with its message at `step`."""

    def close(self, failed: bool = False) -> None:
        """Finish the run; `failed`: training ended with an error."""


class JsonlTracker(Tracker):
    """metrics.jsonl: one JSON object per line, read back with dpo.metrics.read_metrics."""

    name = "jsonl"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int):
        super().__init__(run_dir, run_name, config, resume_step)
        self.path = self.run_dir / "metrics.jsonl"
        self.location = str(self.path)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run logs again the steps after its checkpoint: keep each step once
            kept = [json.dumps(record) for record in read_metrics(self.path) if record.get("step", 0) <= resume_step]
            with metrics_written(self.path):
                write_text_atomically(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        """Append the record as one line."""
        self._append(record)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Append the table as a record of split "samples"."""
        self._append({"split": "samples", "step": step, "name": name, "columns": list(columns),
                      "rows": [[_finite_or_none(value) for value in row] for row in rows]})

    def log_event(self, step: int, name: str, message: str) -> None:
        """Append the alert as a record of split "alert"."""
        self._append({"split": "alert", "step": step, "alert": name, "message": message})

    def _append(self, record: dict[str, Any]) -> None:
        clean = {key: _finite_or_none(value) for key, value in record.items()}
        with metrics_written(self.path), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class TensorBoardTracker(Tracker):
    """Event files in <run_dir>/tensorboard: scalars, the settings (HParams dashboard and a text table), text."""

    name = extra = module = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int):
        super().__init__(run_dir, run_name, config, resume_step)
        # optional: the [tensorboard] extra
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = self.run_dir / "tensorboard"
        self.location = str(log_dir)
        # purge_step hides the events a crashed run logged after its checkpoint, which this run logs again; a run
        # that starts at step 0 hides all of them (a --resume before the first checkpoint starts over)
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step > 0 else 0)
        flat = flat_config(config)
        if resume_step == 0:
            values = {key: value if isinstance(value, (int, float, str)) or value is None else _text(value)
                      for key, value in flat.items()}
            for summary in hparams(values, dict.fromkeys(HPARAM_METRICS, 0.0)):
                self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", markdown_table(["setting", "value"], [[k, _text(v)] for k, v in flat.items()]),
                             global_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        """Each scalar of the record at its step."""
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=record["step"])

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """The table as markdown text at `step`."""
        self.writer.add_text(name, markdown_table(columns, rows), global_step=step)

    def log_event(self, step: int, name: str, message: str) -> None:
        """The alert as text under alerts/<name>."""
        self.writer.add_text(f"alerts/{name}", message, global_step=step)

    def close(self, failed: bool = False) -> None:
        """Flush and close the event file."""
        self.writer.close()


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (TensorBoard's text dashboard renders it); cells on one line each."""
    def cell(value: Any) -> str:
        return (value if isinstance(value, str) else _text(value)).replace("|", "\\|").replace("\n", "<br>")
    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


class WandbTracker(Tracker):
    """A W&B run: online when WANDB_MODE says so or an API key is configured, else offline under <run_dir>/wandb.

    The run id is kept in <run_dir>/wandb_run_id, so a resumed training run continues the same W&B run; a run
    that starts over at step 0 (a --resume before the first checkpoint) is a new W&B run.
    """

    name = extra = module = "wandb"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int):
        super().__init__(run_dir, run_name, config, resume_step)
        import wandb  # optional: the [wandb] extra

        self.wandb = wandb
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() and resume_step > 0 else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(self.run_dir), project=os.environ.get("WANDB_PROJECT") or PROJECT,
                              name=run_name, config=config, id=run_id, resume="allow" if run_id else None,
                              mode=None if os.environ.get("WANDB_MODE") or _wandb_key_configured() else "offline",
                              settings=wandb.Settings(silent=True, console="off"))
        write_text_atomically(id_file, self.run.id)
        self.location = self.run.settings.sync_dir

    def log(self, record: dict[str, Any]) -> None:
        """The record's scalars at its step."""
        metrics = scalars(record)
        if metrics:
            self.run.log(metrics, step=record["step"])

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """The table as a wandb.Table at `step`."""
        table = self.wandb.Table(columns=list(columns), data=[list(row) for row in rows], allow_mixed_types=True)
        self.run.log({name: table}, step=step)

    def log_event(self, step: int, name: str, message: str) -> None:
        """A W&B alert, and the message in the run's summary under alerts/<name>."""
        # an alert notifies (email, Slack); the summary keeps the last one visible on the run's page
        self.run.alert(title=name[:63], text=f"step {step}: {message}", level=self.wandb.AlertLevel.WARN)
        self.run.summary[f"alerts/{name}"] = f"step {step}: {message}"

    def close(self, failed: bool = False) -> None:
        """Finish the W&B run, with exit code 1 when `failed`."""
        self.run.finish(exit_code=1 if failed else 0)


def _wandb_key_configured() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MlflowTracker(Tracker):
    """An MLflow run in MLFLOW_TRACKING_URI, by default a store in the run directory.

    The default store is `sqlite:///<run_dir>/mlflow.db` where sqlalchemy and alembic are installed, else the
    file store `file://<run_dir>/mlruns` (MLflow 3 refuses it unless MLFLOW_ALLOW_FILE_STORE is set, which this
    tracker then sets). Metric keys keep their slashes (`train/rewards/chosen` is a valid MLflow name); any
    character MLflow rejects becomes `_`. The run id is kept in <run_dir>/mlflow_run_id for resuming; a run that
    starts over at step 0 (a --resume before the first checkpoint) is a new run, the crashed one marked KILLED.
    """

    name = extra = module = "mlflow"
    MAX_KEY, MAX_PARAM, MAX_TAG, MAX_BATCH = 250, 6000, 8000, 100

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int):
        super().__init__(run_dir, run_name, config, resume_step)
        # optional: the [mlflow] extra
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic"):
                uri, artifacts = f"sqlite:///{self.run_dir.resolve() / 'mlflow.db'}", self.run_dir / "mlartifacts"
            else:
                uri = (self.run_dir / "mlruns").resolve().as_uri()
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.tracking_uri = self.location = uri
        self.client = MlflowClient(uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            experiment_name, artifact_location=artifacts.resolve().as_uri() if artifacts else None)
        id_file = self.run_dir / "mlflow_run_id"
        if id_file.exists() and resume_step == 0:  # a run starting over: a crashed attempt's run is still RUNNING
            earlier = id_file.read_text().strip()
            if self.client.get_run(earlier).info.status == "RUNNING":
                self.client.set_terminated(earlier, status="KILLED")
        if id_file.exists() and resume_step > 0:
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            write_text_atomically(id_file, self.run_id)
        logged = self.client.get_run(self.run_id).data.params  # MLflow refuses to change a logged param
        params = [Param(self.key(key), _text(value)[:self.MAX_PARAM])
                  for key, value in flat_config(config).items() if self.key(key) not in logged]
        for start in range(0, len(params), self.MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + self.MAX_BATCH])

    @staticmethod
    def key(name: str) -> str:
        """`name` as a valid MLflow metric, param or tag key."""
        return (re.sub(r"/+", "/", re.sub(r"[^\w./ -]", "_", name)).strip("/") or "_")[:MlflowTracker.MAX_KEY]

    def log(self, record: dict[str, Any]) -> None:
        """The record's scalars at its step, in batches MLflow accepts."""
        now = int(time.time() * 1000)
        metrics = [self.Metric(self.key(key), value, now, record["step"]) for key, value in scalars(record).items()]
        for start in range(0, len(metrics), self.MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + self.MAX_BATCH])

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """The table as a JSON artifact <name>/step_<step>.json."""
        table = {"columns": list(columns), "data": [[_finite_or_none(value) for value in row] for row in rows]}
        self.client.log_dict(self.run_id, table, f"{self.key(name)}/step_{step}.json")

    def log_event(self, step: int, name: str, message: str) -> None:
        """The alert as a tag alerts/<name> and a text artifact."""
        self.client.set_tag(self.run_id, f"alerts/{self.key(name)}", f"step {step}: {message}"[:self.MAX_TAG])
        self.client.log_text(self.run_id, message, f"alerts/{self.key(name)}/step_{step}.txt")

    def close(self, failed: bool = False) -> None:
        """End the MLflow run as FINISHED, or FAILED when `failed`."""
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TrackioTracker(Tracker):
    """A trackio run in a local SQLite store: TRACKIO_DIR when set, else <run_dir>/trackio (its dashboard:
    `TRACKIO_DIR=<dir> trackio show --project dpo`)."""

    name = extra = module = "trackio"

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int):
        super().__init__(run_dir, run_name, config, resume_step)
        wanted = os.environ.get("TRACKIO_DIR") or str(self.run_dir / "trackio")
        with _environ(TRACKIO_DIR=wanted):  # optional ([trackio]); it reads its directory once, when first imported
            import trackio
            from trackio import utils as trackio_utils
        self.trackio = trackio
        self.location = str(trackio_utils.TRACKIO_DIR)
        if Path(self.location) != Path(wanted):
            warnings.warn(f"trackio was imported before this run started: it logs to {self.location}", stacklevel=2)
        with _quiet():
            self.run = trackio.init(project=PROJECT, name=self.run_name(run_name, resume_step), config=config,
                                    embed=False, resume="allow" if resume_step > 0 else "never")

    def run_name(self, run_name: str, resume_step: int) -> str:
        """The trackio run's name, kept in <run_dir>/trackio_run_name for resuming: `run_name`, and in a store that
        TRACKIO_DIR shares between runs, with a hash of the run directory (two runs/demo of other projects would
        be one trackio run otherwise, trackio knowing runs by name)."""
        name_file = self.run_dir / "trackio_run_name"
        if resume_step > 0 and name_file.exists():
            return name_file.read_text().strip()
        name = run_name
        if os.environ.get("TRACKIO_DIR"):
            name += "-" + hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:6]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomically(name_file, name)
        return name

    def log(self, record: dict[str, Any]) -> None:
        """The record's scalars at its step."""
        metrics = scalars(record)
        if metrics:
            self.run.log(metrics, step=record["step"])

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """The table as a trackio.Table at `step`."""
        self.run.log({name: self.trackio.Table(columns=list(columns), data=[list(row) for row in rows])}, step=step)

    def log_event(self, step: int, name: str, message: str) -> None:
        """A trackio alert at `step`."""
        with _quiet():
            self.run.alert(title=name, text=message, level=self.trackio.AlertLevel.WARN, step=step)

    def close(self, failed: bool = False) -> None:
        """Finish the trackio run."""
        with _quiet():
            self.run.finish()
        if self.trackio.context_vars.current_run.get() is self.run:
            self.trackio.context_vars.current_run.set(None)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _quiet() -> contextlib.AbstractContextManager:
    """Swallow a library's banner lines (trackio prints where it logs and how to open its dashboard)."""
    return contextlib.redirect_stdout(io.StringIO())


TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (
    JsonlTracker, TensorBoardTracker, WandbTracker, MlflowTracker, TrackioTracker)}

# The names --report-to takes, comma-separated: "all" is every tracker whose library is installed, "none" only
# metrics.jsonl, which every run writes.
REPORT_TO_CHOICES = (*TRACKERS, "all", "none")


class Trackers:
    """The trackers of a run: each call goes to every one; `close` (or leaving a `with` block) closes all."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])

    @property
    def names(self) -> list[str]:
        """The trackers' names, in order."""
        return [tracker.name for tracker in self.trackers]

    def __iter__(self) -> Iterator[Tracker]:
        return iter(self.trackers)

    def log(self, record: dict[str, Any]) -> None:
        """Log the record to every tracker."""
        self._each(lambda tracker: tracker.log(record), record.get("step"))

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log the table to every tracker."""
        self._each(lambda tracker: tracker.log_table(step, name, columns, rows), step)

    def log_event(self, step: int, name: str, message: str) -> None:
        """Log the alert to every tracker."""
        self._each(lambda tracker: tracker.log_event(step, name, message), step)

    def _each(self, call: Callable[[Tracker], None], step: int | None) -> None:
        """`call` on every tracker. metrics.jsonl's errors stop the run; another tracker that fails (its server
        gone, its store deleted) is dropped with a warning, and training goes on: metrics.jsonl keeps every step."""
        for tracker in list(self.trackers):
            if isinstance(tracker, JsonlTracker):
                call(tracker)
                continue
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 - any library error; the run must not die of its tracker
                self.trackers.remove(tracker)
                _warn(f"--report-to {tracker.name} failed at step {step} and logs no more ({_described(error)}); "
                      f"training goes on, metrics.jsonl keeps every step")
                with contextlib.suppress(Exception):
                    tracker.close(failed=True)

    def close(self, failed: bool = False) -> None:
        """Close every tracker (a second call does nothing). metrics.jsonl's error is raised after all were tried,
        unless the run is already ending with an error (`failed`); another tracker's is a warning."""
        trackers, self.trackers = self.trackers, []
        errors = []
        for tracker in trackers:
            try:
                tracker.close(failed)
            except Exception as error:  # noqa: BLE001 - the others still close
                if isinstance(tracker, JsonlTracker) and not failed:
                    errors.append(error)
                else:
                    _warn(f"--report-to {tracker.name} could not close its run ({_described(error)})")
        if errors:
            raise errors[0]

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.close(failed=exc_type is not None)


def resolve_report_to(report_to: str) -> list[type[Tracker]]:
    """The tracker classes `--report-to` names, metrics.jsonl first; ConfigError for an unknown name or a missing
    library. Imports no tracker's library, so every process can check the flag before any work starts."""
    names = [name.strip().lower() for name in (report_to or "").split(",") if name.strip()]
    for name in names:
        if name not in REPORT_TO_CHOICES:
            raise ConfigError(f"--report-to: unknown tracker {name!r}; known: {', '.join(REPORT_TO_CHOICES)}")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError("--report-to none cannot be combined with other trackers")
    if "all" in names:
        names = [name for name, cls in TRACKERS.items() if cls.installed()]
    classes = [TRACKERS[name] for name in dict.fromkeys(["jsonl", *names]) if name != "none"]
    for cls in classes:
        cls.require()
    return classes


def open_trackers(report_to: str, run_dir: str | Path, run_name: str, config: dict[str, Any],
                  resume_step: int = 0, enabled: bool = True) -> Trackers:
    """Start the trackers `report_to` names (metrics.jsonl always) for a run in `run_dir`, continuing after
    `resume_step` when resuming. `enabled=False` (a process other than the main one): trackers that do nothing
    and write no file, after the same checks of `report_to`."""
    classes = resolve_report_to(report_to)
    if not enabled:
        return Trackers()
    opened: list[Tracker] = []
    try:
        for cls in classes:
            opened.append(_start(cls, Path(run_dir), run_name, config, resume_step))
    except BaseException:
        Trackers(opened).close(failed=True)
        raise
    return Trackers(opened)


def _start(cls: type[Tracker], run_dir: Path, run_name: str, config: dict[str, Any], resume_step: int) -> Tracker:
    """A started tracker; a TrackerError naming it when its library cannot start the run."""
    try:
        return cls(run_dir, run_name, config, resume_step)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - each library raises its own types
        resumed = f" (resumed at step {resume_step}: the run continues its tracker's run, in the same store)" \
            if resume_step else ""
        raise TrackerError(f"--report-to {cls.name}: cannot start its run ({_described(error)}){resumed}") from None


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


__all__ = ["REPORT_TO_CHOICES", "TRACKERS", "JsonlTracker", "MlflowTracker", "TensorBoardTracker", "Tracker",
           "TrackerError", "TrackerUnavailable", "Trackers", "TrackioTracker", "WandbTracker", "open_trackers", "resolve_report_to"]
