"""What a job leaves for dashboards: an offline wandb run, TensorBoard events, report.png,
status.json; and a Hydra sweep's comparison table and chart."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from orchestrator.config import compose
from orchestrator.job import run_job
from tests.conftest import ROOT, parity_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logged_run(ray_cluster, tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("dashboards")
    job = compose(parity_overrides(run_dir, data_cache, "strategy=ddp", "cluster.num_workers=2",
                                   "logging.wandb.mode=offline", "run.name=dash-job", "trainer.eval_every=5"))
    summary = run_job(job)
    assert summary["status"] == "succeeded", summary["error"]
    return run_dir, summary


def wandb_records(path):
    """The protobuf records of an offline wandb run file (a LevelDB-style log: 7-byte file
    header, 32 KiB blocks, records split into FULL / FIRST / MIDDLE / LAST chunks)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(buf)
            yield record


def items(update) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_wandb_offline_run_holds_config_and_metrics(logged_run):
    run_dir, summary = logged_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # what `wandb sync` uploads later
    (path,) = offline.glob("run-*.wandb")
    records = list(wandb_records(path))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "dash-job"
    config = items(run.config.update)
    assert config["strategy"]["name"] == "ddp" and config["trainer"]["global_batch_size"] == 12
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    history = [h for h in history if "loss" in h]
    assert [h["step"] for h in history] == list(range(1, summary["steps"] + 1))
    assert [h["loss"] for h in history] == pytest.approx(summary["losses"])
    assert all(h["lr"] > 0 and h["tokens_per_s"] > 0 and h["step_time_s"] > 0 for h in history)
    assert "val_loss" in history[4]
    final = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update(items(r.summary.update))
    assert final["memory/model_states_bytes/rank0"] > 0 and final["memory/model_states_bytes/rank1"] > 0
    assert final["status"] == "succeeded"


def test_tensorboard_events_hold_the_metrics(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, summary = logged_run
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for key in ("loss", "tokens_per_s", "lr", "step_time_s", "val_loss", "memory/model_states_bytes/rank1"):
        assert key in scalars, scalars
    losses = [e.value for e in acc.Scalars("loss")]
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, summary["steps"] + 1))
    assert losses == pytest.approx(summary["losses"])


def test_report_png_and_status_json(logged_run):
    from PIL import Image

    run_dir, summary = logged_run
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as img:
        img.verify()
        assert img.size[0] > 400 and img.size[1] > 200
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["step"] == summary["steps"] and status["restarts"] == 0


def test_multirun_writes_a_comparison(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.train", "-m", "strategy=single,ddp", "cluster.num_workers=1",
         "model=tiny", "trainer.max_steps=3", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
         "trainer.sample_tokens=0", "logging.wandb.mode=disabled", "logging.progress=false",
         f"data.cache_dir={data_cache}", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=540)  # two jobs, each its own Ray cluster
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    table = (sweep / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| job | overrides | strategy")
    rows = table[2:]
    assert len(rows) == 2 and "| strategy=single |" in rows[0] and "| strategy=ddp |" in rows[1]
    assert all("succeeded" in r for r in rows)
    assert (sweep / "comparison.csv").exists()
    assert (sweep / "comparison.png").read_bytes()[:8] == PNG_MAGIC


def test_tensorboard_rewind_purges_the_steps_after_the_checkpoint(tmp_path):
    """A restart from the checkpoint of step 3 replaces steps 4-5; the summary text is kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from orchestrator.metrics import TensorBoardSink

    sink = TensorBoardSink(tmp_path / "tensorboard")
    sink.start([])
    for step in range(1, 6):
        sink.log({"step": step, "loss": float(step), "time": 0.0, "note": "not a number"})
    sink.rewind(3, [])
    for step in (4, 5):
        sink.log({"step": step, "loss": 10.0 * step, "time": 0.0})
    sink.finish({"steps": 5, "status": "succeeded", "losses": [1.0],
                 "memory": {"model_states_bytes_per_rank": [7, 9]}, "peak_rss_bytes_per_rank": [None, 5]})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert [e.value for e in acc.Scalars("memory/model_states_bytes/rank1")] == [9.0]
    assert "memory/peak_rss_bytes/rank0" not in acc.Tags()["scalars"]
    assert "note" not in acc.Tags()["scalars"] and "time" not in acc.Tags()["scalars"]
    (text,) = acc.Tensors("summary")  # the text plugin's tab
    assert b'"status": "succeeded"' in text.tensor_proto.string_val[0]
