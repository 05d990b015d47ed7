"""enigma-plugin-zero: ranks started by `enigma train --nproc 2` (gloo) train exactly as one process does.

Every run here is a real job: the `enigma` command, torch's elastic launcher,
two rank processes meeting over a c10d rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tiny_models import CORPUS, make_model

ENIGMA = Path(sys.executable).with_name("enigma")
RUN = ["--seq-len", "32", "--batch-size", "2", "--lr", "3e-3", "--grad-clip", "0.5", "--warmup-steps", "2",
       "--val-fraction", "0.1", "--eval-interval", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GQA Llama with tied embeddings and a chat template, and a corpus beside it."""
    root = tmp_path_factory.mktemp("zero")
    make_model(root / "model", "llama-gqa", template="chatml")
    (root / "corpus.txt").write_text(CORPUS * 6)
    return root


def train(base: Path, out: str, *extra: str, check: bool = True, wait: bool = True) -> subprocess.CompletedProcess:
    command = [str(ENIGMA), "train", "--data", str(base / "corpus.txt"), "--model", str(base / "model"),
               "--out", str(base / out), *RUN, *extra]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def weights(base: Path, out: str) -> dict[str, torch.Tensor]:
    return load_file(str(base / out / "model.safetensors"))


def record(base: Path, out: str) -> dict:
    return json.loads((base / out / "enigma_training.json").read_text())


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def one_process(base: Path) -> str:
    """The reference: one process, 4 micro-batches a step, clipping on."""
    train(base, "one", "--max-steps", "6", "--grad-accum", "4")
    return "one"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_two_ranks_give_one_process_weights_and_stages_shard_the_optimizer(base, one_process, stage):
    out = f"zero{stage}"
    done = train(base, out, "--max-steps", "6", "--grad-accum", "2", "--nproc", "2", "--zero", str(stage))
    assert "Model saved to" in done.stdout
    assert largest_difference(weights(base, one_process), weights(base, out)) <= 1e-5
    single, sharded = record(base, one_process), record(base, out)
    assert sharded["world_size"] == 2 and sharded["distribution"].startswith(f"ZeRO-{stage} on 2 ranks")
    assert sharded["steps"] == single["steps"] == 6
    assert abs(sharded["val_loss"] - single["val_loss"]) <= 1e-4
    (whole,) = single["optimizer_state_bytes_per_rank"]
    per_rank = sharded["optimizer_state_bytes_per_rank"]
    if stage == 0:
        assert per_rank == [whole, whole]
    else:  # Adam's two moments, about half on each rank (stage 1 assigns whole parameters to ranks)
        assert sum(per_rank) == pytest.approx(whole, rel=0.01)
        assert all(abs(held - whole / 2) <= 0.1 * whole for held in per_rank), (per_rank, whole)


def test_the_final_model_loads_and_the_checkpoint_holds_each_ranks_share(base, one_process):
    from enigma import LLM, SamplingParams

    train(base, "zero2-ckpt", "--max-steps", "4", "--save-interval", "2", "--nproc", "2", "--zero", "2")
    checkpoint = base / "zero2-ckpt" / "checkpoints" / "step-0000002"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "state.pt").is_file()
    assert sorted(p.name for p in (checkpoint / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((base / "zero2-ckpt" / "checkpoints").glob(".*partial"))
    llm = LLM(str(base / "zero2-ckpt"))
    assert llm.generate(["def"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids


def rank_process(parent: int, rank: int, timeout: float = 60.0):
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "enigma_zero.rank" in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


def test_a_killed_rank_fails_the_job_by_name_and_resume_finishes_it_exactly(base):
    steps = ["--max-steps", "40", "--save-interval", "10", "--nproc", "2", "--zero", "2"]
    train(base, "whole", *steps)

    job = train(base, "cut", *steps, wait=False)
    latest = base / "cut" / "checkpoints" / "latest"
    victim = rank_process(job.pid, 1)
    deadline = time.monotonic() + 120
    while not (latest.is_file() and latest.read_text().strip() >= "step-0000020"):
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "no checkpoint at step 20"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 1
    assert "rank 1 of 2 failed (killed by SIGKILL)" in stderr and "continue with --resume" in stderr, stderr[-2000:]
    assert not (base / "cut" / "model.safetensors").exists()

    train(base, "cut", *steps, "--resume")
    assert largest_difference(weights(base, "whole"), weights(base, "cut")) <= 1e-6
    assert record(base, "cut")["steps"] == 40


def test_each_process_torchrun_starts_trains_as_a_rank(base, one_process):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "enigma_cli", "train", "--data", str(base / "corpus.txt"), "--model", str(base / "model"),
               "--out", str(base / "torchrun"), *RUN, "--max-steps", "6", "--grad-accum", "2", "--zero", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Model saved to") == 1  # rank 0 saves and says so
    assert largest_difference(weights(base, one_process), weights(base, "torchrun")) <= 1e-5


def test_zero_on_one_process_runs_the_sharded_path_in_this_process(base, one_process):
    from enigma.training import TrainConfig
    from enigma.training import train as run

    config = TrainConfig(data=[str(base / "corpus.txt")], model=str(base / "model"), out=str(base / "inproc"),
                         seq_len=32, batch_size=2, lr=3e-3, grad_clip=0.5, warmup_steps=2, val_fraction=0.1,
                         eval_interval=3, threads=1, max_steps=6, grad_accum=4, zero=2)
    run(config)
    assert largest_difference(weights(base, one_process), weights(base, "inproc")) <= 1e-5
    assert record(base, "inproc")["distribution"].startswith("ZeRO-2 on 1 ranks")


def test_a_ranks_error_reaches_the_user_and_bad_stages_are_refused(base):
    done = train(base, "bad", "--max-steps", "2", "--nproc", "2", "--zero", "2", "--method", "dpo", check=False)
    assert done.returncode == 1
    assert re.search(r"Error: rank [01] of 2 failed \(.*prompt", done.stderr), done.stderr[-2000:]

    done = train(base, "bad3", "--nproc", "2", "--zero", "3", check=False)
    assert done.returncode == 2 and "--zero" in done.stderr

    train(base, "stage1", "--max-steps", "4", "--save-interval", "2", "--nproc", "2", "--zero", "1")
    done = train(base, "stage1", "--max-steps", "6", "--nproc", "2", "--zero", "2", "--resume", check=False)
    assert done.returncode == 1
    assert "written with --zero 1 on 2 ranks; resume it with the same" in done.stderr, done.stderr[-2000:]


def test_lora_adapters_train_the_same_on_two_ranks(base):
    lora = ["--method", "lora", "--lora-rank", "4", "--max-steps", "4"]
    train(base, "lora-one", *lora, "--grad-accum", "2")
    train(base, "lora-again", *lora, "--grad-accum", "2")  # adapters start from --seed: runs repeat exactly
    train(base, "lora-two", *lora, "--nproc", "2", "--zero", "2")
    adapters = {out: load_file(str(base / out / "adapter_model.safetensors"))
                for out in ("lora-one", "lora-again", "lora-two")}
    assert largest_difference(adapters["lora-one"], adapters["lora-again"]) == 0
    assert largest_difference(adapters["lora-one"], adapters["lora-two"]) <= 1e-6


def test_the_rank_that_died_is_named_not_the_ones_the_launcher_stopped(tmp_path):
    from types import SimpleNamespace

    from enigma_zero.launch import root_cause

    stopped = SimpleNamespace(exitcode=-signal.SIGTERM, timestamp=100)
    killed = SimpleNamespace(exitcode=-signal.SIGKILL, timestamp=100)  # same second: the launcher's clock
    assert root_cause(SimpleNamespace(failures={0: stopped, 1: killed}), tmp_path)[0] == 1
    (tmp_path / "rank-0.txt").write_text("bad data")
    assert root_cause(SimpleNamespace(failures={0: stopped, 1: killed}), tmp_path)[0] == 0
