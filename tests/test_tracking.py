"""Trackers: what each one logs is read back with that tracker's own reader."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from dpo.errors import UserError
from dpo.metrics import read_metrics
from dpo.settings import ConfigError
from dpo.tracking import REPORT_TO_CHOICES, TRACKERS, JsonlTracker, open_trackers, resolve_report_to

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("tensorboard", "wandb", "mlflow", "trackio")
INSTALLED = [name for name in LIBRARIES if TRACKERS[name].installed()]
RUN_NAME = "tracking-test"

CONFIG = {"model": "tiny", "lr": 1e-6, "beta": 0.1, "batch_size": 8, "target_modules": ["q_proj", "v_proj"],
          "adapter": None, "packing": True}
METRICS = {"loss": 0.6931, "rewards/chosen": 0.0125, "rewards/rejected": -0.02, "rewards/accuracies": 0.5,
           "rewards/margins": 0.0325, "logps/chosen": -120.5, "logps/rejected": -130.25}
TRAIN = {"lr": 1e-6, "grad_norm": 1.5, "pairs_per_s": 8.25, "tokens_per_s": 4096.0, "skipped_steps": 0,
         "loss_scale": 65536.0}
TABLE = ("eval/samples", ["prompt", "completion", "reward"], [["2+2 | ?", "4\nfour", 0.75], ["hi", "hello", -0.5]])
EVENT = ("nan_loss", "loss was not finite at step 3; the step was skipped")

# (call, arguments) in the order a run makes them: train steps 1-4, eval at 2 and 4, a table, an alert
CALLS = [
    ("log", {"split": "train", "step": 1, "epoch": 0.25, **METRICS, **TRAIN, "loss_scale": None}),
    ("log", {"split": "train", "step": 2, "epoch": 0.5, **METRICS, "loss": 0.65, **TRAIN, "grad_norm": math.nan}),
    ("log", {"split": "eval", "step": 2, "epoch": 0.5, **METRICS, "loss": 0.66, "pairs": 64,
             "generate/win_rate": 0.5625}),
    ("log_table", (2, *TABLE)),
    ("log", {"split": "train", "step": 3, "epoch": 0.75, **METRICS, "loss": 0.6, **TRAIN, "skipped_steps": 1,
             "overflow": True}),
    ("log_event", (3, *EVENT)),
    ("log", {"split": "train", "step": 4, "epoch": 1.0, "loss": 0.55, "error": "a string is not a metric"}),
    ("log", {"split": "eval", "step": 4, "epoch": 1.0, **METRICS, "loss": 0.58, "pairs": 64}),
]
RECORDS = [args for call, args in CALLS if call == "log"]


def replay(trackers) -> None:
    for call, args in CALLS:
        getattr(trackers, call)(*(args if isinstance(args, tuple) else (args,)))


def expected_scalars() -> dict[str, list[tuple[int, float]]]:
    """Tracker key -> [(step, value)] of the finite numbers in RECORDS (bools, strings, None and NaN left out)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in RECORDS:
        for key, value in record.items():
            if key in ("split", "step") or isinstance(value, (bool, str)) or value is None or not math.isfinite(value):
                continue
            series.setdefault(f"{record['split']}/{key}", []).append((record["step"], float(value)))
    return series


def as_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def isolate(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Every library offline, writing under `root` only (home, caches, temporary files)."""
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "TMPDIR", "WANDB_CACHE_DIR",
                 "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        (root / name.lower()).mkdir(exist_ok=True)
        mp.setenv(name, str(root / name.lower()))
    mp.setattr(tempfile, "tempdir", str(root / "tmpdir"))
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                        "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        mp.setenv(name, value)
    for name in ("TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_DIR", "WANDB_BASE_URL"):
        mp.delenv(name, raising=False)


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    root = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        isolate(mp, root)
        yield root


@pytest.fixture(scope="module")
def run(isolated, tmp_path_factory):
    """One run through every installed tracker: its directory and its trackers (closed)."""
    run_dir = tmp_path_factory.mktemp("run")
    trackers = open_trackers(",".join(INSTALLED) or "none", run_dir, RUN_NAME, CONFIG, resume_step=0)
    opened = {tracker.name: tracker for tracker in trackers}
    replay(trackers)
    trackers.close()
    return run_dir, opened


def test_jsonl_holds_the_records_the_table_and_the_alert(run):
    run_dir, _ = run
    expected = []
    for call, args in CALLS:
        if call == "log":
            expected.append({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in args.items()})
        elif call == "log_table":
            step, name, columns, rows = args
            expected.append({"split": "samples", "step": step, "name": name, "columns": columns, "rows": rows})
        else:
            step, name, message = args
            expected.append({"split": "alert", "step": step, "alert": name, "message": message})
    assert read_metrics(run_dir / "metrics.jsonl") == expected


def test_tensorboard_scalars_texts_and_hparams(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    run_dir, _ = run
    events = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance=dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0))
    events.Reload()
    expected = expected_scalars()
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for key, series in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(s, float(np.float32(v))) for s, v in series], key

    def texts(tag):
        return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
                for e in events.Tensors(f"{tag}/text_summary")]

    [(step, table)] = texts("eval/samples")
    assert step == 2 and table.splitlines() == ["| prompt | completion | reward |", "|---|---|---|",
                                                "| 2+2 \\| ? | 4<br>four | 0.75 |", "| hi | hello | -0.5 |"]
    assert texts("alerts/nan_loss") == [(3, EVENT[1])]
    [(step, config)] = texts("config")
    assert step == 0 and {"| lr | 1e-06 |", '| target_modules | ["q_proj", "v_proj"] |'} <= set(config.splitlines())
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["lr"].number_value == 1e-6 and hparams["batch_size"].number_value == 8
    assert hparams["model"].string_value == "tiny" and hparams["target_modules"].string_value == '["q_proj", "v_proj"]'


def wandb_records(sync_file: str) -> list[dict]:
    """The records of a W&B run's transaction log, as wandb's own inspector prints them."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", sync_file],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "No such command" in done.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` to read its transaction log")
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_wandb_offline_history_config_table_and_alert(run):
    pytest.importorskip("wandb")
    run_dir, trackers = run
    tracker = trackers["wandb"]
    assert tracker.run.settings.mode == "offline" and (run_dir / "wandb_run_id").read_text() == tracker.run.id
    records = wandb_records(tracker.run.settings.sync_file)
    history: dict[str, list[tuple[int, float]]] = {}
    rows = [record["history"]["item"] for record in records if record["type"] == "history"]
    for row in rows:
        for key, value in row.items():
            if not key.startswith("_") and not key.startswith("eval/samples."):
                history.setdefault(key, []).append((row["_step"], value))
    assert history == expected_scalars()
    [config] = [record["run"]["config"]["update"] for record in records if record["type"] == "run"]
    assert {key: config[key] for key in CONFIG} == CONFIG
    [table_row] = [row for row in rows if "eval/samples._type" in row]
    assert table_row["_step"] == 2 and table_row["eval/samples._type"] == "table-file"
    table = json.loads((Path(tracker.run.settings.files_dir) / table_row["eval/samples.path"]).read_text())
    assert table["columns"] == TABLE[1] and table["data"] == TABLE[2]
    [alert] = [record["alert"] for record in records if record["type"] == "alert"]
    assert alert["title"] == EVENT[0] and alert["text"] == f"step 3: {EVENT[1]}" and alert["level"] == "WARN"


def test_mlflow_metrics_params_and_artifacts(run, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, trackers = run
    tracker = trackers["mlflow"]
    client = MlflowClient(tracker.tracking_uri)
    run_id = (run_dir / "mlflow_run_id").read_text()
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.run_name == RUN_NAME and mlflow_run.info.status == "FINISHED"
    expected = expected_scalars()
    assert sorted(mlflow_run.data.metrics) == sorted(expected)
    for key, series in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == series, key
    assert mlflow_run.data.params == {key: as_text(value) for key, value in CONFIG.items()}
    assert mlflow_run.data.tags["alerts/nan_loss"] == f"step 3: {EVENT[1]}"
    table = json.loads(Path(client.download_artifacts(run_id, "eval/samples/step_2.json", str(tmp_path))).read_text())
    assert table == {"columns": TABLE[1], "data": TABLE[2]}
    text = Path(client.download_artifacts(run_id, "alerts/nan_loss/step_3.txt", str(tmp_path))).read_text()
    assert text == EVENT[1]


def test_trackio_logs_config_table_and_alert(run):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    run_dir, trackers = run
    assert Path(trackers["trackio"].location) == run_dir / "trackio"
    logs = SQLiteStorage.get_logs("dpo", RUN_NAME)
    series: dict[str, list[tuple[int, float]]] = {}
    for row in logs:
        for key, value in row.items():
            if key not in ("step", "timestamp", "eval/samples"):
                series.setdefault(key, []).append((row["step"], value))
    assert series == expected_scalars()
    [table] = [row for row in logs if "eval/samples" in row]
    assert table["step"] == 2
    assert table["eval/samples"]["_value"] == [dict(zip(TABLE[1], row, strict=True)) for row in TABLE[2]]
    [alert] = SQLiteStorage.get_alerts("dpo", run_name=RUN_NAME)
    assert (alert["title"], alert["text"], alert["step"], alert["level"]) == (*EVENT, 3, "warn")
    config = SQLiteStorage.get_run_config("dpo", RUN_NAME)
    assert {key: config[key] for key in CONFIG} == CONFIG


def test_a_resumed_run_logs_each_step_once_in_the_same_runs(isolated, tmp_path):
    names = [name for name in INSTALLED if name != "trackio"]  # trackio's directory is the first run's
    report_to = ",".join(names) or "none"

    def train(steps, resume_step, offset):
        with open_trackers(report_to, tmp_path, RUN_NAME, CONFIG, resume_step=resume_step) as trackers:
            for step in steps:
                trackers.log({"split": "train", "step": step, "loss": step / 10 + offset})
            return {tracker.name: tracker for tracker in trackers}

    first = train(range(1, 5), 0, 0.0)  # steps 3 and 4 were logged after the checkpoint at step 2
    second = train(range(3, 6), 2, 1.0)
    expected = [(1, 0.1), (2, 0.2), (3, 1.3), (4, 1.4), (5, 1.5)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == expected
    if "tensorboard" in names:
        from tensorboard.backend.event_processing import event_accumulator

        events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, float(np.float32(v)))
                                                                            for s, v in expected]
    if "wandb" in names:
        assert second["wandb"].run.id == first["wandb"].run.id == (tmp_path / "wandb_run_id").read_text()
    if "mlflow" in names:
        assert second["mlflow"].run_id == first["mlflow"].run_id == (tmp_path / "mlflow_run_id").read_text()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(second["mlflow"].tracking_uri)
        assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("dpo").experiment_id])] \
            == [first["mlflow"].run_id]
        assert client.get_run(first["mlflow"].run_id).info.status == "FINISHED"


def test_a_run_starting_over_before_its_first_checkpoint_logs_each_step_once_in_new_runs(isolated, tmp_path):
    """A crash before the first checkpoint, then --resume: the run starts over at step 0 and logs steps 1-3 again.
    TensorBoard hides the first attempt's events, W&B and MLflow get new runs (MLflow's first one marked KILLED)."""
    names = [name for name in INSTALLED if name != "trackio"]  # trackio's directory is the first run's
    report_to = ",".join(names) or "none"

    def attempt(offset, crash):
        trackers = open_trackers(report_to, tmp_path, RUN_NAME, CONFIG, resume_step=0)
        for step in (1, 2, 3):
            trackers.log({"split": "train", "step": step, "loss": step / 10 + offset})
        opened = {tracker.name: tracker for tracker in trackers}
        if not crash:
            trackers.close()
        elif "wandb" in opened:  # W&B keeps one run per process: a crashed process's run ends with it
            opened["wandb"].run.finish(exit_code=1)
        return opened

    first, second = attempt(0.0, crash=True), attempt(1.0, crash=False)
    expected = [(1, 1.1), (2, 1.2), (3, 1.3)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == expected
    if "tensorboard" in names:
        first["tensorboard"].writer.flush()
        from tensorboard.backend.event_processing import event_accumulator

        events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, float(np.float32(v)))
                                                                            for s, v in expected]
    if "wandb" in names:
        assert second["wandb"].run.id != first["wandb"].run.id
        assert (tmp_path / "wandb_run_id").read_text() == second["wandb"].run.id
    if "mlflow" in names:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(second["mlflow"].tracking_uri)
        assert second["mlflow"].run_id != first["mlflow"].run_id
        assert client.get_run(first["mlflow"].run_id).info.status == "KILLED"
        assert client.get_run(second["mlflow"].run_id).info.status == "FINISHED"
        history = client.get_metric_history(second["mlflow"].run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == expected


def test_runs_of_one_name_in_a_shared_trackio_store_are_kept_apart(run, tmp_path, monkeypatch):
    """TRACKIO_DIR shared by two projects' runs/demo: each its own trackio run, and a resumed one continues its
    own (trackio knows runs by name)."""
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    _, trackers = run
    monkeypatch.setenv("TRACKIO_DIR", trackers["trackio"].location)  # the store trackio was imported with

    def train(run_dir, steps, resume_step):
        with open_trackers("trackio", run_dir, "demo", CONFIG, resume_step=resume_step) as opened:
            for step in steps:
                opened.log({"split": "train", "step": step, "loss": step / 10 + len(str(run_dir))})
            return [tracker for tracker in opened if tracker.name == "trackio"][0].run.name

    a, b = tmp_path / "a" / "demo", tmp_path / "b" / "demo"
    name_a, name_b = train(a, [1, 2], 0), train(b, [1, 2, 3], 0)
    assert name_a != name_b and name_a.startswith("demo-") and (b / "trackio_run_name").read_text() == name_b
    assert train(b, [3, 4], 2) == name_b  # resumed after its step 2: into its own run
    steps = {name: sorted(row["step"] for row in SQLiteStorage.get_logs("dpo", name)) for name in (name_a, name_b)}
    assert steps[name_a] == [1, 2] and steps[name_b][-1] == 4 and 4 not in steps[name_a]


def test_jsonl_keeps_the_lines_up_to_the_resumed_step(tmp_path):
    with open_trackers("none", tmp_path, RUN_NAME, CONFIG) as trackers:
        for step in range(1, 5):
            trackers.log({"split": "train", "step": step, "loss": float(step)})
        trackers.log_event(4, "spike", "loss jumped")
    JsonlTracker(tmp_path, RUN_NAME, CONFIG, resume_step=2).log({"split": "train", "step": 3, "loss": 30.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0),
                                                                                         (3, 30.0)]


def test_a_line_that_is_no_record_is_named_unless_it_is_a_last_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n[3]\n{"step": 4}\n{"step": 5, "l')
    with pytest.warns(UserWarning) as caught:
        assert read_metrics(path) == [{"step": 1}, {"step": 4}]
    assert [str(w.message) for w in caught] == [f"{path}, line 2: not a JSON record, left out",
                                                f"{path}, line 3: not a JSON record, left out"]


def test_a_process_other_than_the_main_one_writes_nothing(isolated, tmp_path):
    with open_trackers(",".join(INSTALLED) or "none", tmp_path / "run", RUN_NAME, CONFIG, enabled=False) as trackers:
        assert trackers.names == []
        replay(trackers)
    assert list(tmp_path.iterdir()) == []


def test_report_to_names():
    assert resolve_report_to("none") == resolve_report_to("") == resolve_report_to("jsonl") == [JsonlTracker]
    assert resolve_report_to("all") == [TRACKERS[name] for name in ("jsonl", *INSTALLED)]
    if "tensorboard" in INSTALLED:
        assert resolve_report_to(" TensorBoard , jsonl,tensorboard") == [JsonlTracker, TRACKERS["tensorboard"]]
    with pytest.raises(ConfigError) as error:
        resolve_report_to("tensorboard,neptune")
    message = str(error.value)
    assert "\n" not in message and "'neptune'" in message and all(name in message for name in REPORT_TO_CHOICES)
    with pytest.raises(ConfigError, match="none cannot be combined"):
        resolve_report_to("none,wandb")


@pytest.mark.parametrize("name", LIBRARIES)
def test_a_missing_library_names_the_extra_and_starts_nothing(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, name, None)  # what an uninstalled package looks like to the import system
    with pytest.raises(UserError) as error:
        open_trackers(name, tmp_path / "run", RUN_NAME, CONFIG)
    assert str(error.value) == f'--report-to {name} needs the {name} package: pip install -e ".[{name}]"'
    assert isinstance(error.value, ConfigError) and not (tmp_path / "run").exists()


PROBE = """
import sys
import dpo.tracking
dpo.tracking.resolve_report_to("all")
libraries = ("wandb", "mlflow", "trackio", "tensorboard", "torch.utils.tensorboard")
print(sorted(name for name in libraries if name in sys.modules))
"""


def test_importing_the_module_imports_no_tracker_library():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


class Failing(JsonlTracker.__base__):
    """A tracker whose calls raise from step `fails_at` on (its server gone), and whose close may raise too."""

    name = "failing"

    def __init__(self, fails_at: int, close_fails: bool = False):
        self.fails_at, self.close_fails, self.logged, self.closed = fails_at, close_fails, [], []

    def log(self, record):
        if record["step"] >= self.fails_at:
            raise ConnectionError("server gone\nsecond line")
        self.logged.append(record["step"])

    def log_table(self, step, name, columns, rows):
        self.log({"step": step})

    def log_event(self, step, name, message):
        self.log({"step": step})

    def close(self, failed=False):
        self.closed.append(failed)
        if self.close_fails:
            raise OSError("cannot close")


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning_and_metrics_jsonl_keeps_every_step(tmp_path, capsys):
    from dpo.tracking import Trackers

    failing = Failing(fails_at=3)
    trackers = Trackers([JsonlTracker(tmp_path, RUN_NAME, CONFIG, 0), failing])
    replay(trackers)
    trackers.close()
    assert failing.logged == [1, 2, 2, 2] and failing.closed == [True]  # steps 1-2 (a record, a table), then dropped
    alone = Trackers([JsonlTracker(tmp_path / "alone", RUN_NAME, CONFIG, 0)])
    replay(alone)
    alone.close()
    assert (tmp_path / "metrics.jsonl").read_text() == (tmp_path / "alone" / "metrics.jsonl").read_text()
    warnings = capsys.readouterr().err.strip().splitlines()
    assert warnings == ["warning: --report-to failing failed at step 3 and logs no more (ConnectionError: server "
                        "gone); training goes on, metrics.jsonl keeps every step"]


def test_a_tracker_that_cannot_close_warns_and_an_error_being_raised_is_not_replaced(tmp_path, capsys):
    from dpo.tracking import Trackers

    trackers = Trackers([JsonlTracker(tmp_path, RUN_NAME, CONFIG, 0), Failing(fails_at=99, close_fails=True)])
    trackers.log({"split": "train", "step": 1, "loss": 0.5})
    trackers.close()  # the run's work is saved: a tracker that cannot close is no error of the run
    assert capsys.readouterr().err.strip() == "warning: --report-to failing could not close its run (OSError: " \
                                              "cannot close)"
    jsonl = JsonlTracker(tmp_path / "b", RUN_NAME, CONFIG, 0)
    jsonl.close = lambda failed=False: (_ for _ in ()).throw(OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        Trackers([jsonl]).close()
    with pytest.raises(KeyError):  # the error ending the run stays the one raised
        with Trackers([jsonl]):
            raise KeyError("the run's own error")


@pytest.mark.parametrize("name", ["mlflow", "tensorboard"])
def test_a_tracker_that_cannot_start_its_run_stops_the_run_in_one_line(isolated, name, tmp_path, monkeypatch):
    from dpo.tracking import TensorBoardTracker, TrackerError

    pytest.importorskip(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")  # a scheme MLflow has no store for

    def unwritable(*args, **kwargs):
        raise PermissionError("[Errno 13] Permission denied: 'tensorboard'\nmore")

    monkeypatch.setattr(TensorBoardTracker, "__init__", unwritable)
    with pytest.raises(TrackerError) as error:
        open_trackers(name, tmp_path, RUN_NAME, CONFIG)
    message = str(error.value)
    assert message.startswith(f"--report-to {name}: cannot start its run (") and "\n" not in message


def test_a_resumed_run_whose_tracker_run_is_gone_says_so_in_one_line(isolated, tmp_path):
    from dpo.tracking import TrackerError

    pytest.importorskip("mlflow")
    with open_trackers("mlflow", tmp_path, RUN_NAME, CONFIG) as trackers:
        trackers.log({"split": "train", "step": 1, "loss": 0.5})
    (tmp_path / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")  # a run of another store
    with pytest.raises(TrackerError) as error:
        open_trackers("mlflow", tmp_path, RUN_NAME, CONFIG, resume_step=2)
    message = str(error.value)
    assert message.startswith("--report-to mlflow: cannot start its run (") and "\n" not in message
    assert message.endswith("(resumed at step 2: the run continues its tracker's run, in the same store)")


def test_training_goes_on_when_a_tracker_fails_mid_run(isolated, tmp_path, monkeypatch, capsys):
    from harness import make_run_dir, run_metrics, train_tiny
    from dpo.tracking import TensorBoardTracker

    pytest.importorskip("tensorboard")
    make_run_dir(tmp_path, 24)
    logged = TensorBoardTracker.log

    def log(self, record):
        if record["step"] >= 2:
            raise OSError("No space left on device")
        logged(self, record)

    monkeypatch.setattr(TensorBoardTracker, "log", log)
    out = train_tiny(tmp_path, "out", "--report-to", "tensorboard", "--max-steps", "3", "--batch-size", "4",
                     "--micro-batch-size", "2", "--eval-steps", "2")
    assert (out / "final").is_dir()
    assert [r["step"] for r in run_metrics(out, "train")] == [1, 2, 3]
    assert capsys.readouterr().err.count("warning: --report-to tensorboard failed at step 2") == 1
