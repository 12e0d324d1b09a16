"""Training at production grade: overrides, backbone weights, validation and the best
checkpoint, resume after an interruption (only under the run's own setup, or afresh with
run.restart), a killed worker, and a job through `ray job submit` (refused without shared storage).

Everything runs on a real local Ray (the `ray_local` fixture), except the `ray job submit`
test, which starts its own Ray head (`ray start --head`) and stops only that head.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from pathlib import Path

import psutil
import pytest
from pydantic import BaseModel

from mga.errors import InputError
from pipelines import demo, train
from pipelines.train import runs, validation, weights
from pipelines.train.checkpoints import TrainingFailed
from pipelines.config import ConfigError, TrainConfig, load_config
from pipelines.model_store import load_model
from pipelines.storage import resolve
from tests.cluster import free_ports
from tests.tiny import TRAIN

REPO = Path(__file__).resolve().parents[1]
TINY = TRAIN


@pytest.fixture()
def catalog(synthetic_catalog) -> str:
    """The session's synthetic catalog (12 queries at validation)."""
    return synthetic_catalog


def _config(catalog: str, root: Path, name: str, *overrides: str) -> TrainConfig:
    return load_config(
        "tiny",
        TINY + list(overrides),
        extra={"data": {"catalog": catalog}, "run": {"output": str(root / f"model-{name}"), "storage_path": str(root / "runs"), "name": name}},
    )


# --------------------------------------------------------------------------- configuration


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", annotation


def _other_value(key: str, annotation, value):
    """A valid value different from `value`, for any leaf of TrainConfig."""
    special = {"model.token_dim": 128, "model.heads": 8, "run.checkpoint_every": 5, "optim.weight_decay": 0.01,
               "data.items_per_batch": 10, "data.groups_per_batch": 4}  # P stays a multiple of G
    if key in special:
        return special[key]
    if typing.get_origin(annotation) is typing.Literal:
        return next(option for option in typing.get_args(annotation) if option != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.01
    if isinstance(value, tuple):
        return [item + 1 for item in value]
    return "s3://bucket/some/value" if value in (None, "") else f"{value}-x"


@pytest.mark.timeout(60)
def test_every_config_value_can_be_overridden_from_the_command_line():
    base = load_config("tiny")
    leaves = list(_leaves(TrainConfig))
    assert len(leaves) > 40 and ("run.validate_every", int) in leaves
    for key, annotation in leaves:
        node = base
        for part in key.split("."):
            node = getattr(node, part)
        new = _other_value(key, annotation, node)
        # Through the CLI's own parser: `--config tiny --set key=value`.
        args = argparse_namespace("--set", f"{key}={json.dumps(new)}")
        changed = train.config_from_args(args)
        got = changed
        for part in key.split("."):
            got = getattr(got, part)
        assert got == (tuple(new) if isinstance(new, list) else new) != node, key
    for name in ("tiny", "inshop", "consumer2shop"):
        assert load_config(name).run.validate_every % load_config(name).run.checkpoint_every == 0


def argparse_namespace(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    train.build_parser(parser)
    return parser.parse_args(["--config", "tiny", *argv])


@pytest.mark.timeout(60)
def test_validation_settings_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match=r"run.validate_every=3 must be a multiple of run.checkpoint_every=2"):
        load_config("tiny", ["run.checkpoint_every=2", "run.validate_every=3"])
    with pytest.raises(ConfigError, match=r"run.artifact_from=best needs validation"):
        load_config("tiny", ["run.validate_every=0", "run.artifact_from=best"])
    with pytest.raises(ConfigError, match=r"run.best_metric"):
        load_config("tiny", ["run.best_metric=loss"])


# --------------------------------------------------------------------------- backbone weights


@pytest.mark.timeout(240)
def test_pretrained_without_a_hub_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    env.pop("RAY_ADDRESS", None)
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.train", "--config", "tiny", "--set", "run.pretrained=hub",
         "--catalog", str(tmp_path / "catalog"), "--output", str(tmp_path / "model")],
        capture_output=True, text=True, timeout=200, env=env, cwd=REPO,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "run.pretrained=hub" in lines[0] and "run.weights_file" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    # It failed in the driver, before a Ray instance was started.
    assert "Started a local Ray instance" not in done.stdout + done.stderr, time.time() - started


@pytest.mark.timeout(120)
def test_weights_file_local_or_s3_is_loaded_and_a_bad_one_is_refused(tmp_path, s3_env):
    import boto3
    import timm
    import torch
    from safetensors.torch import save_file

    from mga.model import MGAModel

    reference = timm.create_model("tf_efficientnet_lite0")
    weights_path = tmp_path / "b0.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in reference.state_dict().items()}, str(weights_path))
    boto3.client("s3", endpoint_url=s3_env["endpoint"], region_name="us-east-1").upload_file(str(weights_path), s3_env["bucket"], "weights/b0.safetensors")

    for uri in (str(weights_path), f"s3://{s3_env['bucket']}/weights/b0.safetensors"):
        config = load_config("tiny", TINY + [f"run.weights_file={uri}"])
        weights.check_backbone_weights(config)  # the driver's check passes
        path = weights.local_weights_file(uri)
        assert Path(path).read_bytes() == weights_path.read_bytes()
        model = MGAModel(config.model, weights_file=path)
        torch.testing.assert_close(model.backbone.body.conv_stem.weight, reference.conv_stem.weight)
    assert weights.describe_weights(config).startswith("file s3://")

    missing = load_config("tiny", TINY + [f"run.weights_file={tmp_path / 'nope.safetensors'}"])
    with pytest.raises(FileNotFoundError, match="run.weights_file: .*nope.safetensors does not exist"):
        weights.check_backbone_weights(missing)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv_stem.weight": torch.zeros(3, 3, 3, 3)}, str(wrong))
    with pytest.raises(ValueError, match=r"run.weights_file: .*wrong.safetensors cannot be loaded into tf_efficientnet_lite0"):
        weights.check_backbone_weights(load_config("tiny", TINY + [f"run.weights_file={wrong}"]))


# --------------------------------------------------------------------------- validation, best checkpoint, resume


def _epoch_lines(capfd, last: int) -> list[tuple[int, float | None, int | None]]:
    """(epoch, val mAP as printed if validated, resumed-from epoch) of the epoch lines on the console, in order.

    Rank 0's lines reach this process through Ray's log forwarding, a little after the
    worker printed them: wait until the line of epoch `last` has come.
    """
    text, deadline = "", time.time() + 60
    while True:
        out, err = capfd.readouterr()
        text += out + err
        lines = []
        for line in text.splitlines():
            if epoch := re.search(r"\[train\] epoch (\d+)/", line):
                value = re.search(r" mAP ([0-9.]+) \(global", line)
                resumed = re.search(r"resumed from the checkpoint of epoch (\d+)", line)
                lines.append((int(epoch[1]), float(value[1]) if value else None, int(resumed[1]) if resumed else None))
        if any(epoch == last for epoch, _, _ in lines) or time.time() > deadline:
            # Ray Train's placement-group cleaner polls the state API, which a local Ray (no
            # dashboard) lacks: without pipelines.worker_setup it logs a warning every second.
            assert "Failed to query Ray Train Controller" not in text, text[-3000:]
            return lines
        time.sleep(0.5)


def _train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this session's local Ray (all descendants of this process)."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:
            continue
    return workers


def _in_thread(action) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = action()
        except BaseException as error:  # noqa: BLE001 - reported by the test's assertions
            outcome["error"] = error

    runner = threading.Thread(target=target, daemon=True)
    runner.start()
    return runner, outcome


def _kill_a_worker_after_the_first_checkpoint(run_path: Path, runner: threading.Thread) -> set[int]:
    """Once Ray Train has registered a checkpoint of the run, SIGKILL one of its workers; the workers' pids."""
    import ray.train

    deadline = time.time() + 300
    while True:
        assert runner.is_alive() and time.time() < deadline, "the run ended or stalled before its first checkpoint"
        try:
            if ray.train.Result.from_path(str(run_path)).checkpoint is not None:
                break
        except Exception:  # noqa: BLE001 - no checkpoint registered yet (or its record is being written)
            pass
        time.sleep(0.1)
    workers = _train_workers()
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    return {worker.pid for worker in workers}


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_interrupted_run_resumes_and_the_best_checkpoint_is_kept(ray_local, catalog, mlflow_server, tmp_path, capfd):
    epochs = 4
    settings = [f"optim.epochs={epochs}", "scaling.num_workers=1", "run.checkpoint_every=1", "run.validate_every=1",
                "run.keep_checkpoints=1", "run.max_failures=0", f"run.tracking_uri={mlflow_server}", "run.experiment=resume-test",
                "run.register_as=mga-resume"]
    config = _config(catalog, tmp_path, "resume", *settings)

    # 1. Interrupted: its only worker is killed once a checkpoint is registered (no failure allowed).
    runner, outcome = _in_thread(lambda: train.run(config))
    _kill_a_worker_after_the_first_checkpoint(tmp_path / "runs" / "resume", runner)
    runner.join(timeout=300)
    assert isinstance(outcome.get("error"), TrainingFailed), outcome
    interrupted_after = int(re.search(r"resumes from the checkpoint after epoch (\d+)", str(outcome["error"])).group(1))
    assert 1 <= interrupted_after < epochs
    assert not resolve(config.run.output).join("artifact.json").exists()

    # 2. The same command again: it resumes after that epoch and runs the rest only.
    result = train.run(config)
    assert result["epochs"] == epochs and result["resumed_after_epochs"] == [interrupted_after]
    _, model_id, saved = load_model(config.run.output)
    assert model_id == result["model_id"]
    assert saved["train"]["epochs"] == epochs and saved["train"]["config"]["optim"]["epochs"] == epochs
    assert saved["train"]["resumed_after_epochs"] == [interrupted_after] and saved["train"]["checkpoint"] == "last"
    for key in ("val_R@1", "val_mAP", "val_global_R@1", "val_global_mAP"):
        assert 0.0 <= result["metrics"][key] <= 1.0 and key in saved["train"]["validation"]
    assert result["metrics"]["val_queries"] == 12 and "query/gallery" in saved["train"]["validation"]["source"]
    lines = _epoch_lines(capfd, epochs)
    resumed = [index for index, (_, _, start) in enumerate(lines) if start is not None]
    assert len(resumed) == 1, lines
    epoch, _, start = lines[resumed[0]]
    assert (epoch, start) == (interrupted_after + 1, interrupted_after), lines
    assert [epoch for epoch, _, _ in lines[resumed[0]:]] == list(range(interrupted_after + 1, epochs + 1)), lines

    # 3. Ray Train kept the latest checkpoint and the best by val_mAP (keep_checkpoints=1).
    val_map = {epoch: value for epoch, value, _ in lines}  # the last line of an epoch: the run that kept it
    import ray.train

    kept = {int(metrics["epoch"]): metrics["val_mAP"] for _, metrics in ray.train.Result.from_path(result["run_path"]).best_checkpoints}
    assert epochs in kept and len(kept) <= 2, kept
    best = max(kept, key=lambda epoch: (kept[epoch], epoch))
    assert round(kept[best], 3) == max(val_map.values()), (kept, val_map)  # the console shows 3 decimals

    # 4. run.artifact_from=best: the same run, nothing left to train, the artifact from the best.
    best_config = _config(catalog, tmp_path, "resume", *settings, "run.artifact_from=best", f"run.output={tmp_path / 'model-best'}")
    chosen = train.run(best_config)
    _, _, saved_best = load_model(best_config.run.output)
    assert chosen["epochs"] == best and saved_best["train"]["epochs"] == best and saved_best["train"]["checkpoint"] == "best"
    assert saved_best["train"]["validation"]["val_mAP"] == pytest.approx(kept[best])
    out, err = capfd.readouterr()
    assert f"already trained to epoch {epochs}" in out and "[train] epoch" not in out + err  # no epoch re-run

    # 5. MLflow: one run across the interruption, the resume and the re-export, each epoch logged by rank 0
    # (an epoch run again after the interruption is logged again, at the same step), both artifacts registered.
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("resume-test").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "resume" and run.data.params["run.seed"] == "0"
    history = client.get_metric_history(run.info.run_id, "val_mAP")
    assert sorted({metric.step for metric in history}) == list(range(1, epochs + 1))
    last = {metric.step: metric.value for metric in sorted(history, key=lambda metric: metric.timestamp)}
    assert last == {epoch: pytest.approx(value, abs=5e-4) for epoch, value in val_map.items()}  # the console shows 3 decimals
    versions = sorted(client.search_model_versions("name = 'mga-resume'"), key=lambda version: int(version.version))
    assert [(version.version, version.run_id, version.tags["model_id"]) for version in versions] == [
        ("1", run.info.run_id, result["model_id"]), ("2", run.info.run_id, load_model(best_config.run.output)[1])]
    assert run.data.tags["model_id"] == versions[-1].tags["model_id"]


# --------------------------------------------------------------------------- one run, one setup


def _catalog_table(uri: str, rows: list[tuple[str, str, str, str]]) -> int:
    """A real catalog table holding `rows` (image_id, item_id, split, domain; image bytes and the other columns null), as its next version."""
    import pyarrow as pa

    from pipelines.schemas import CATALOG
    from pipelines.storage import write_parquet
    from pipelines.tables import TableWriter

    table = pa.Table.from_pylist([dict(zip(("image_id", "item_id", "split", "domain"), row)) for row in rows], schema=CATALOG)
    with TableWriter(resolve(uri)) as writer:
        write_parquet(writer.file("part-0.parquet"), table, row_group_size=8)
        return writer.commit(CATALOG, {"table": "catalog", "rows": table.num_rows}).version


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_a_run_under_another_setup_is_refused_and_run_restart_starts_it_afresh(trained_model, tmp_path, capfd, monkeypatch):
    # A copy of the session's trained run (1 epoch, 2 workers, name "t"): this test replaces it.
    shutil.copytree(trained_model["root"] / "runs", tmp_path / "runs")
    catalog, setup = trained_model["catalog"], ["optim.epochs=1", "scaling.num_workers=2"]
    stored = json.loads((tmp_path / "runs" / "t" / runs.RUN_FILE).read_text())
    assert stored["fingerprint"]["model.alpha"] == 0.5 and stored["fingerprint"]["train classes"] == 6
    assert "optim.epochs" not in stored["fingerprint"] and "data.catalog" not in stored["fingerprint"]

    # The same setup from a copy of the catalog (the same train rows elsewhere): re-exported.
    shutil.copytree(catalog, tmp_path / "catalog-copy")
    again = train.run(_config(str(tmp_path / "catalog-copy"), tmp_path, "t", *setup))
    assert again["epochs"] == 1 and "already trained to epoch 1" in capfd.readouterr().out

    # Another alpha: refused in one line naming it, before Ray Train starts (the re-export path too).
    with pytest.raises(InputError) as refused:
        train.run(_config(catalog, tmp_path, "t", *setup, "model.alpha=1.0"))
    assert "\n" not in str(refused.value) and re.fullmatch(
        r"run t in \S+/runs/t was trained with model.alpha=0.5; this command asks for model.alpha=1.0: "
        r"use another run.name, or --set run.restart=true to start it afresh", str(refused.value)), refused.value
    # Another catalog: its train rows and class count.
    _catalog_table(str(tmp_path / "other"), [(f"i{item}{view}", f"i{item}", "train", "shop") for item in range(4) for view in range(2)])
    with pytest.raises(InputError, match=r"was trained with catalog train rows \w{12} of \S+ version \d+, 24 images, train classes=6; "
                       r"this command asks for catalog train rows \w{12} of \S+/other version 0, 8 images, train classes=4"):
        train.run(_config(str(tmp_path / "other"), tmp_path, "t", *setup, "run.validate_every=0"))
    # More epochs continue the run: not a difference.
    longer = train.absolute_uris(_config(catalog, tmp_path, "t", "optim.epochs=5", "scaling.num_workers=2"))
    rows = runs.catalog_rows(longer.data.catalog)
    runs.check_same_run(longer, resolve(str(tmp_path / "runs" / "t")), runs.fingerprint(longer, rows, 6), rows)
    assert "[train] epoch" not in "".join(capfd.readouterr())

    # run.restart=true: the old checkpoints go, an alpha 1.0 model is trained from the start; its MLflow
    # server (MLFLOW_TRACKING_URI) is down: one warning line, and the training goes on.
    (closed,) = free_ports(1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed}")
    fresh = _config(catalog, tmp_path, "t", "optim.epochs=1", "scaling.num_workers=1", "model.alpha=1.0", "run.restart=true")
    result = train.run(fresh)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert result["resumed_after_epochs"] == [] and result["epochs"] == 1
    out, err = capfd.readouterr()
    assert "run.restart: deleted the checkpoints of run t" in out
    warnings = [line for line in (out + err).splitlines() if "MLflow" in line]
    assert len(warnings) == 1 and re.search(rf"\[tracking\] warning: MLflow at http://127.0.0.1:{closed}: .*Connection refused.*goes on without it", warnings[0]), warnings
    _, _, saved = load_model(fresh.run.output)
    assert saved["train"]["config"]["model"]["alpha"] == 1.0 and saved["train"]["lr"] == fresh.optim.lr
    assert json.loads((tmp_path / "runs" / "t" / runs.RUN_FILE).read_text())["fingerprint"]["model.alpha"] == 1.0
    # ... and is now the run's setup: the same command without run.restart re-exports it.
    train.run(_config(catalog, tmp_path, "t", "optim.epochs=1", "model.alpha=1.0", f"run.output={tmp_path / 'again'}"))
    assert "already trained to epoch 1" in capfd.readouterr().out
    exported, trained = load_model(str(tmp_path / "again"))[0].state_dict(), load_model(fresh.run.output)[0].state_dict()
    assert exported.keys() == trained.keys() and all(exported[name].equal(trained[name]) for name in trained)


@pytest.mark.timeout(60)
def test_the_fingerprint_leaves_out_epochs_and_follows_the_worker_count_only_with_linear_lr_scaling(tmp_path, monkeypatch):
    rows = {"uri": "c", "version": 0, "images": 8, "digest": "0" * 64}

    def fingerprint(*overrides: str) -> dict:
        return runs.fingerprint(load_config("tiny", list(overrides)), rows, 4)

    assert fingerprint("optim.epochs=3", "scaling.num_workers=1") == fingerprint("optim.epochs=30", "scaling.num_workers=4")
    linear = [fingerprint("optim.lr_scaling=linear", f"scaling.num_workers={workers}") for workers in (1, 4)]
    assert runs.difference(linear[0], linear[1], rows, rows) == "was trained with scaling.num_workers=1; this command asks for scaling.num_workers=4"
    config = load_config("tiny", ["optim.lr_scaling=linear", "scaling.num_workers=4", "optim.lr=0.001"])
    assert config.effective_lr() == pytest.approx(0.004) and load_config("tiny", ["scaling.num_workers=4"]).effective_lr() == 0.001

    # Connected to a cluster without a storage path: refused before anything connects.
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with pytest.raises(InputError, match=r"run.storage_path: training on the Ray cluster at 10.0.0.1:6379 needs checkpoint storage that every node reaches"):
        train.run(load_config("tiny", [], extra={"data": {"catalog": str(tmp_path / "c")}, "run": {"output": str(tmp_path / "m")}}))


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_the_storage_probe_names_the_nodes_that_cannot_see_a_path(ray_local, tmp_path):
    assert runs.nodes_without(str(tmp_path)) == []
    missing = runs.nodes_without(str(tmp_path / "not-here"))
    assert len(missing) == 1 and missing == [node["NodeManagerAddress"] for node in ray_local.nodes() if node["Alive"]]


@pytest.mark.timeout(60)
def test_the_demo_names_a_run_after_what_shapes_it():
    assert demo.run_name("tiny", [], 0) == "demo-seed0"
    assert demo.run_name("tiny", ["model.alpha=1.0", "run.restart=true"], 0) == "demo-seed0-model.alpha=1.0"
    assert demo.run_name("inshop", ["model.layers=[2, 3]"], 2) == "demo-seed2-inshop-model.layers=_2,_3_"
    long = demo.run_name("tiny", [f"loss.margin=0.{digit}" for digit in range(1, 9)] * 3, 0)
    assert len(long) < 100 and long != demo.run_name("tiny", [f"loss.margin=0.{digit}" for digit in range(1, 9)] * 2, 0)


# --------------------------------------------------------------------------- fault tolerance


# (A worker lost mid-run, its whole node with it: Ray Train restarts the group from the last
# checkpoint, on a multi-node cluster: tests/test_multinode.py.)
# (`ray job submit` of a training, on a multi-node cluster that loses a node: tests/test_multinode.py)


# --------------------------------------------------------------------------- smaller pieces


@pytest.mark.timeout(60)
def test_validation_selection_prefers_the_val_split_and_caps_queries_and_gallery(tmp_path):
    uri = str(tmp_path / "catalog")

    def catalog(rows):
        return _catalog_table(uri, rows)

    test_rows = [(f"t{i}{v}", f"t{i}", "query" if v < 2 else "gallery", "consumer" if v < 2 else "shop") for i in range(6) for v in range(4)]
    val_rows = [(f"v{i}{v}", f"v{i}", "val", "consumer" if v == 0 else "shop") for i in range(5) for v in range(3)]
    version = catalog(test_rows + val_rows)
    chosen = validation.select_validation(uri, max_queries=3, max_gallery=8, seed=0)
    assert chosen["catalog_version"] == version == 0  # the Validator reads the images at this version
    assert chosen["source"].startswith("val split: consumer queries")
    assert len(chosen["queries"]) == 3 and {image_id[0] for image_id, _ in chosen["queries"] + chosen["gallery"]} == {"v"}
    query_items = {item for _, item in chosen["queries"]}
    gallery_items = [item for _, item in chosen["gallery"]]
    # Every positive of the sampled queries is in the gallery, then distractors up to the cap.
    assert all(gallery_items.count(item) == 2 for item in query_items) and len(gallery_items) == 8
    assert chosen == validation.select_validation(uri, max_queries=3, max_gallery=8, seed=0)  # seeded

    assert catalog(test_rows) == 1  # no val split: the held-out query/gallery items, and it says so
    chosen = validation.select_validation(uri, max_queries=100, max_gallery=100, seed=0)
    assert "query/gallery" in chosen["source"] and "optimistic" in chosen["source"]
    assert len(chosen["queries"]) == 12 and len(chosen["gallery"]) == 12 and chosen["catalog_version"] == 1

    catalog([(f"s{i}{v}", f"s{i}", "val", "shop") for i in range(3) for v in range(3)] + [("lone", "x", "val", "shop")])
    chosen = validation.select_validation(uri, max_queries=100, max_gallery=100, seed=0)  # one domain: first image queries
    assert chosen["source"].endswith("first image queries its others")
    assert [image_id for image_id, _ in chosen["queries"]] == ["s00", "s10", "s20"] and len(chosen["gallery"]) == 7

    catalog([("q", "a", "train", "shop")])
    assert validation.select_validation(uri, 10, 10, 0) is None


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_worker_group_that_starves_the_decode_tasks_is_refused(ray_local, catalog, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = _config(catalog, tmp_path, "starved", "scaling.num_workers=2", "scaling.cpus_per_worker=2", "run.validate_every=0")
    with pytest.raises(ValueError, match=r"scaling: 2 workers x 2 CPUs take 4 of the 4 CPUs of the local Ray instance"):
        train.run(config)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_gpu_workers_on_a_local_instance_without_gpus_are_refused(ray_local, catalog, tmp_path, monkeypatch):
    # Ray Train would retry the worker group's start every minute, forever.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gpus = int(ray_local.cluster_resources().get("GPU", 0))  # 0 here; one more than a GPU machine has
    config = _config(catalog, tmp_path, "no-gpus", f"scaling.num_workers={gpus + 1}", "scaling.cpus_per_worker=0.5", "scaling.use_gpu=true", "run.validate_every=0")
    with pytest.raises(ValueError, match=rf"scaling.use_gpu=true: {gpus + 1} GPU workers, but the local Ray instance has {gpus} GPUs"):
        train.run(config)
