"""Bad input fails before any worker starts, naming the key and what is allowed."""
from __future__ import annotations

import subprocess
import time

import pytest

from orchestrator.config import compose
from orchestrator.errors import ConfigError
from tests.conftest import ROOT, cli


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (["cluster.num_workers=0"], "cluster.num_workers", ">= 1"),
        (["data.paths=[/nonexistent/corpus.txt]"], "data.paths", "/nonexistent/corpus.txt"),
        (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], "trainer.global_batch_size", "divisible"),
        (["strategy=single"], "cluster.num_workers", "exactly 1"),
        (["model.n_heads=3"], "model.dim", "n_heads"),
        (["precision=fp16"], "precision", "auto, fp32, bf16"),
        (["data.seq_len=4096"], "data.seq_len", "max_seq_len"),
        # Keys that were not checked before (issue 26), each with its allowed range.
        (["cluster.start_timeout_s=0"], "cluster.start_timeout_s", "> 0"),
        (["cluster.setup_timeout_s=0"], "cluster.setup_timeout_s", "> 0"),
        (["cluster.collective_timeout_s=-1"], "cluster.collective_timeout_s", "> 0"),
        (["trainer.save_timeout_s=0"], "trainer.save_timeout_s", "> 0"),
        (["optim.eps=0"], "optim.eps", "> 0"),
        (["optim.weight_decay=-0.1"], "optim.weight_decay", ">= 0"),
        (["optim.grad_clip=-1"], "optim.grad_clip", ">= 0"),
        (["optim.warmup_steps=-1"], "optim.warmup_steps", ">= 0"),
        (["model.init_std=0"], "model.init_std", "> 0"),
        (["model.rope_theta=-1"], "model.rope_theta", "> 0"),
        (["model.norm_eps=0"], "model.norm_eps", "> 0"),
        (["run.name=a/b"], "run.name", "letters, digits"),
        (["run.name=''"], "run.name", "letters, digits"),
        (["data.cache_dir=''"], "data.cache_dir", "folder"),
        (["trainer.step_timeout_s=nan"], "trainer.step_timeout_s", "finite"),
        (["alignment.beta=inf"], "alignment.beta", "finite"),
        # Composition errors (a misspelt key, an unknown group option) are ConfigErrors too.
        (["trainer.max_stepz=3"], "trainer.max_stepz", "Could not override"),
        (["model=huge"], "model", "Available options"),
        (["data=sft"], "data.paths", "missing"),
    ],
)
def test_semantic_errors_name_the_key(overrides, key, hint):
    with pytest.raises(ConfigError) as err:
        compose(["model=tiny", "run.dir=/tmp/unused", *overrides])
    assert err.value.key == key
    assert hint in str(err.value)


@pytest.mark.parametrize("overrides, key, hint", [
    (["inference.request_timeout_s=0"], "inference.request_timeout_s", "positive"),
    (["inference.name=a/b"], "inference.name", "letters, digits"),
    (["/some/run"], "/some/run", "checkpoint=/some/run"),
])
def test_serve_config_errors_name_the_key(overrides, key, hint):
    from orchestrator.inference.config import compose as serve_compose

    with pytest.raises(ConfigError) as err:
        serve_compose(["checkpoint=/nonexistent", *overrides] if "=" in overrides[0] else overrides)
    assert err.value.key == key and hint in str(err.value), str(err.value)


CLI_CASES = [
    (["launch.generate", "--url", "http://127.0.0.1:9", "hi"], "--url http://127.0.0.1:9: no server answers"),
    (["launch.generate", "--url", "notaurl", "hi"], "--url: 'notaurl' is not a server address"),
    (["launch.status", "--watch", "-1", "--address", "http://127.0.0.1:9"], "--watch: must be"),
    (["launch.export", "/nonexistent/run", "/tmp/unused-export"], "RUN_DIR: /nonexistent/run"),
    (["launch.submit", "--no-follow", "trainer.max_stepz=3", "cluster.address=http://127.0.0.1:9"],
     "trainer.max_stepz"),
    (["launch.submit", "--no-follow", "model=huge", "cluster.address=http://127.0.0.1:9"], "error: model:"),
    (["launch.serve", "/some/run"], "did you mean checkpoint=/some/run"),
    (["launch.serve", "checkpoint=/some/run", "inference.port=99999"], "inference.port: must be in [0, 65535]"),
]


def test_every_command_refuses_bad_arguments_with_exit_2_naming_them():
    """Each command's bad argument: one line naming the option or key, exit 2, no traceback."""
    import sys

    for args, words in CLI_CASES:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


@pytest.mark.parametrize("args, words", [
    (["", "--max-tokens", "4"], "PROMPT: empty"),
    (["ROMEO: " * 400], "PROMPT: "),
    (["ROMEO:", "--top-p", "0"], "--top-p: must be a number in (0, 1]"),
    (["ROMEO:", "--temperature", "3"], "--temperature: must be a number in [0, 2]"),
    (["ROMEO:", "--max-tokens", "0"], "--max-tokens: must be an integer >= 1"),
])
def test_generate_names_the_option_of_a_bad_request(serve_source, args, words):
    """Checked before the engine starts: one line naming the option, exit 2, no traceback."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "launch.generate", str(serve_source), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        proc.stderr[-2000:]


def test_good_config_is_typed():
    job = compose(["model=tiny", "strategy=ddp", "cluster.num_workers=3", "trainer.global_batch_size=12",
                   "trainer.micro_batch_size=2", "run.dir=/tmp/unused"])
    assert job.strategy.name == "ddp" and job.strategy.bucket_cap_mb == 25
    assert job.cluster.num_workers == 3 and isinstance(job.optim.lr, float)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["strategy=nosuch"], ["strategy", "ddp", "single"]),
        (["model=nosuch"], ["model", "tiny", "small"]),
        (["trainer.max_stpes=5"], ["max_stpes"]),
        (["trainer.max_steps=many"], ["max_steps", "many"]),
        (["cluster.num_workers=0"], ["cluster.num_workers", ">= 1"]),
        (["data.paths=[missing.txt]"], ["data.paths", "missing.txt"]),
        (["trainer.global_batch_size=7"], ["trainer.global_batch_size", "divisible"]),
        (["model=tiny", "strategy=tp", "strategy.tp=3", "cluster.num_workers=3"], ["model.n_heads", "tp=3"]),
    ],
)
def test_cli_bad_input_exits_2_without_workers(args, expected, tmp_path):
    start = time.time()
    proc = subprocess.run(cli(*args, f"run.dir={tmp_path / 'run'}"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    for word in expected:
        assert word in out, out
    assert "Started a local Ray instance" not in out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert time.time() - start < 60


def test_cli_ds_config_conflict_exits_2(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 3}')
    proc = subprocess.run(cli("strategy=zero2", f"strategy.ds_config={ds}", f"run.dir={tmp_path / 'run'}"),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "strategy.ds_config" in out and "train_micro_batch_size_per_gpu=3" in out
    assert "trainer.micro_batch_size = 8" in out
    assert "Started a local Ray instance" not in out


def test_experiment_presets_compose(tmp_path):
    pre = compose(["+experiment=pretrain", f"run.dir={tmp_path}"])
    assert pre.model.name == "small" and pre.trainer.checkpoint_every == 100 and pre.data.val_fraction > 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "response": "r"}\n')
    sft = compose(["+experiment=sft", f"run.dir={tmp_path}", f"data.paths=[{rows}]"])
    assert sft.data.format == "sft" and sft.trainer.eval_every == 50
