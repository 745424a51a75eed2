"""Training over two processes (FSDP2 on gloo, launched by ``fitune train --nproc 2``) against one process.

The reference is one process with twice the gradient accumulation: the same micro-batches make each optimizer
step, so losses, gradient norms and weights must agree (QLoRA's 4-bit weights sharded too: each process holds
half of their bytes). SGD keeps the comparison honest: AdamW would hide a
constant factor on the gradients (a sum over ranks instead of a mean). The embeddings have 261 rows, which two
ranks cannot split evenly, and the micro-batches hold different numbers of target tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fitune.distributed.launch import ended
from fitune.recipe import Recipe
from fitune.trainer.run import train

from .conftest import tiny_recipe

STEPS = 3


def _recipe(tmp_path: Path, kind: str, grad_accum: int, **train_fields) -> dict:
    r = tiny_recipe(
        tmp_path,
        train={
            "batch_size": 2,
            "grad_accum": grad_accum,
            "max_steps": STEPS,
            "optimizer": "sgd",
            "lr": 0.05,
            **train_fields,
        },
    )
    r["model"]["config"]["vocab_size"] = 261  # uneven rows over two ranks
    r["method"] = {"kind": "full"} if kind == "full" else {"kind": kind, "r": 8, "alpha": 16}
    r["samples"] = {"prompts": ["say 3"], "max_new_tokens": 3}
    return r


def _fitune(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The fitune command in a fresh interpreter; a collective that waits for a rank gives up within a
    minute, so a call made by one rank only fails the test instead of hanging it."""
    env = {**os.environ, "FITUNE_COLLECTIVE_TIMEOUT_MIN": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fitune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fitune_with_rank_1_dying(tmp_path: Path, at_step: int, *args: str) -> subprocess.CompletedProcess:
    """``_fitune`` with rank 1 exiting (code 7) in the middle of its ``at_step``-th step, as a crashed process
    would: a ``sitecustomize`` on the processes' path replaces its train step."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import fitune.step as step\n"
        "    real, calls = step.train_step, []\n"
        "    def train_step(session, batches):\n"
        "        calls.append(1)\n"
        f"        if len(calls) == {at_step}:\n"
        "            os._exit(7)\n"
        "        return real(session, batches)\n"
        "    step.train_step = train_step\n"
    )
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), old_path]))
    try:
        return _fitune(*args, cwd=tmp_path, timeout=200)
    finally:
        if old_path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old_path


def _rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.mark.limits(mem_gib=6, timeout_s=300)
@pytest.mark.parametrize("kind", ["lora", "qlora", "full"])
def test_two_processes_train_as_one_process_does_over_the_same_global_batch(tmp_path, kind):
    one = _recipe(tmp_path / "one", kind, grad_accum=2)
    train(Recipe.model_validate(one), progress=False, echo=lambda line: None)

    two = _recipe(tmp_path / "two", kind, grad_accum=1)
    path = tmp_path / "two" / "recipe.yaml"
    path.write_text(yaml.safe_dump(two))
    done = _fitune("train", str(path), "--nproc", "2", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: 3 steps" in done.stdout
    assert done.stdout.count("eval loss before training") == 1  # rank 0 alone prints

    a, b = Path(one["output"]["dir"]), Path(two["output"]["dir"])
    steps_a, steps_b = _rows(a, "metrics.jsonl"), _rows(b, "metrics.jsonl")
    assert [r["step"] for r in steps_b] == [1, 2, 3]  # one row per step: rank 0 alone writes
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)  # a sum over ranks would double
        assert rb["tokens"] == ra["tokens"]  # the run's throughput counts both ranks' tokens
    # 5 eval examples in micro-batches of 2: rank 0 takes two, rank 1 one and a pass whose tokens count nothing
    evals_a, evals_b = _rows(a, "evals.jsonl"), _rows(b, "evals.jsonl")
    assert [e["loss"] for e in evals_b] == pytest.approx([e["loss"] for e in evals_a], rel=1e-5)
    assert json.loads((b / "fitune-run.json").read_text())["status"] == "done"
    assert "sharded over 2 processes with FSDP2" in done.stdout
    plan = json.loads((b / "plan.json").read_text())  # the launcher's plan of one process, kept by rank 0
    assert plan["ranks"] == 2 and plan["phase_breakdowns"]["steady_step"]["gathered_weights"] > 0
    again = _fitune("train", str(path), "--nproc", "2", cwd=tmp_path)  # the folder is refused before launch
    assert again.returncode == 1 and "already holds a finished run" in again.stderr
    assert "process 0 of 2" not in again.stderr and "Traceback" not in again.stderr

    folder = "model" if kind == "full" else "adapter"
    wa, wb = _weights(a / folder), _weights(b / folder)
    assert set(wa) == set(wb)
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() < 1e-5, name
    if kind != "full":  # a plain peft adapter
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from fitune.models.sources import config_from_dict

        base = AutoModelForCausalLM.from_config(config_from_dict(two["model"]["config"], where="tiny"))
        model = PeftModel.from_pretrained(base, str(b / "adapter"))
        assert sum(1 for n, _ in model.named_parameters() if "lora_" in n) == len(wb)


@pytest.mark.limits(mem_gib=6, timeout_s=240)
def test_a_process_that_dies_ends_the_run_naming_it_without_a_hang(tmp_path):
    r = _recipe(tmp_path, "lora", grad_accum=1, max_steps=50)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    t0 = time.monotonic()
    done = _fitune_with_rank_1_dying(tmp_path, 2, "train", str(path), "--nproc", "2", "--no-progress")
    took = time.monotonic() - t0
    assert done.returncode == 7, done.stdout + done.stderr
    assert "process 1 of 2 ended with exit code 7; the other processes were stopped" in done.stderr
    assert "Traceback" not in done.stderr
    assert took < 150
    marker = json.loads((Path(r["output"]["dir"]) / "fitune-run.json").read_text())
    assert marker["status"] in ("failed", "running")  # rank 0 may be stopped before it writes its last word


def test_a_killed_process_is_named_with_its_signal():
    assert ended(1, 2, -9) == (
        "process 1 of 2 was killed by SIGKILL (the system's out-of-memory killer, or a kill by hand)"
    )
    assert ended(0, 4, 3) == "process 0 of 4 ended with exit code 3"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.limits(mem_gib=6, timeout_s=300)
@pytest.mark.parametrize("rendezvous", ["c10d", "static"])
def test_two_nodes_on_one_machine_train_through_torchrun(tmp_path, rendezvous):
    """Two torchrun agents of one process each, as on two machines: a c10d rendezvous (ranks assigned by
    it), or static --node-rank with a master address."""
    reference = _recipe(tmp_path / "ref", "lora", grad_accum=2)
    train(Recipe.model_validate(reference), progress=False, echo=lambda line: None)
    r = _recipe(tmp_path / "nodes", "lora", grad_accum=1)
    path = tmp_path / "nodes" / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    port = _free_port()
    env = {**os.environ, "FITUNE_COLLECTIVE_TIMEOUT_MIN": "1", "OMP_NUM_THREADS": "1"}
    runs = []
    for node in (0, 1):
        if rendezvous == "c10d":
            where = [
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "fitune-test",
            ]
        else:
            where = ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        command += [*where, "-m", "fitune", "train", str(path), "--no-progress"]
        runs.append(
            subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=240)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], "\n".join(outputs)
    assert sum("done: 3 steps" in out for out in outputs) == 1  # the node of rank 0 reports
    ref = _rows(Path(reference["output"]["dir"]), "metrics.jsonl")
    got = _rows(Path(r["output"]["dir"]), "metrics.jsonl")
    assert [g["loss"] for g in got] == pytest.approx([x["loss"] for x in ref], rel=1e-5)


@pytest.mark.limits(mem_gib=6, timeout_s=240)
def test_ctrl_c_stops_every_process_after_the_same_step_with_a_checkpoint(tmp_path):
    import signal

    r = _recipe(tmp_path, "lora", grad_accum=1, max_steps=100000)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    run = Path(r["output"]["dir"])
    env = {**os.environ, "FITUNE_COLLECTIVE_TIMEOUT_MIN": "1"}
    command = [sys.executable, "-m", "fitune", "train", str(path), "--nproc", "2", "--no-progress"]
    # a session of its own: Ctrl-C in a terminal reaches the launcher and both processes, as here
    p = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 150
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
            assert time.monotonic() < deadline and p.poll() is None, "the run did not reach its first step"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, out + err
    assert err.count("error: interrupted by SIGINT after step") == 1, err  # rank 0 says it, once
    assert "Traceback" not in err
    marker = json.loads((run / "fitune-run.json").read_text())
    assert (marker["status"], marker["signal"]) == ("interrupted", "SIGINT")
    step = marker["checkpoint_step"]  # both processes wrote their shards of the step they stopped after
    assert step >= 1 and f"the checkpoint of step {step} is in" in err and "--resume" in err
    assert json.loads((run / "checkpoint" / "state.json").read_text())["processes"] == 2


def test_each_process_holds_its_share_of_the_4bit_weights_and_of_their_scales(tmp_path):
    """QLoRA's packed NF4 weights are sharded like any other, and so are their block scales (absmax): on 2
    ranks each holds half of the packed bytes and its shard of each layer's scales (a fake process group
    stands for the other rank; fully_shard makes no collective while it shards)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fitune.memory.tracker import QUANT_STATE_PARAMETER
    from fitune.session import build_session

    r = Recipe.model_validate(_recipe(tmp_path, "qlora", grad_accum=1))

    def held(session) -> tuple[int, list[int]]:
        """(packed 4-bit bytes, each layer's block-scale bytes) this process holds."""
        packed, scales = 0, []
        for module in session.model.modules():
            state = getattr(module, "quant_state", None)
            if state is None:
                continue
            weight, absmax = module.weight, module._parameters.get(QUANT_STATE_PARAMETER, state.absmax)
            packed += (weight.to_local() if isinstance(weight, DTensor) else weight).nbytes
            scales.append((absmax.to_local() if isinstance(absmax, DTensor) else absmax).nbytes)
        return packed, scales

    packed, scales = held(build_session(r, with_tokenizer=False))
    dist.init_process_group("fake", rank=1, world_size=2, store=FakeStore())
    try:
        sharded = build_session(r, with_tokenizer=False)
        assert sharded.ranks == 2
        packed_1, scales_1 = held(sharded)
        assert packed > 0 and packed_1 == packed // 2
        # rank 1's shard of each layer's scales: what the first half, rounded up, leaves
        assert scales and scales_1 == [n - (n + 1) // 2 for n in scales]
        assert all(
            getattr(m, "quant_state", None) is None or m.quant_state.absmax is None
            for m in sharded.model.modules()
        )
    finally:
        dist.destroy_process_group()


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in _rows(run, "metrics.jsonl")]


@pytest.mark.limits(mem_gib=6, timeout_s=400)
@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_a_sharded_checkpoint_resumes_on_two_processes_and_on_one(tmp_path, kind):
    """A run of 2 processes checkpoints at step 2 and loses a process in step 4; resumed on 2 processes it
    repeats the uninterrupted run's losses to the digit written, on 1 process (twice the accumulation, the
    same global batch) to float rounding. QLoRA's checkpoint holds the adapters only: the resumed run
    quantizes its base again, to the same bytes."""
    import shutil

    def recipe(name: str, grad_accum: int, **output) -> Path:
        r = _recipe(tmp_path / name, kind, grad_accum=grad_accum, max_steps=6, optimizer="adamw", lr=1e-3)
        r["output"] = {"dir": str(tmp_path / name / "run"), **output}
        path = tmp_path / name / "recipe.yaml"
        path.write_text(yaml.safe_dump(r))
        return path

    straight = recipe("straight", 1)
    done = _fitune("train", str(straight), "--nproc", "2", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    crash = recipe("crash", 1, save_every=2)
    died = _fitune_with_rank_1_dying(tmp_path, 4, "train", str(crash), "--nproc", "2", "--no-progress")
    assert died.returncode == 7, died.stdout + died.stderr
    checkpoint = tmp_path / "crash" / "run" / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text()) == {
        "step": 2,
        "processes": 2,
        "micro_batches": 4,
    }
    assert sorted(p.name for p in checkpoint.glob("rng-*.safetensors")) == [
        "rng-0.safetensors",
        "rng-1.safetensors",
    ]
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    weights = {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    adapter = _weights(tmp_path / "straight" / "run" / "adapter")
    assert len(weights) == len(adapter) and all("lora_" in k for k in weights)  # the adapters, no base

    reference = _losses(tmp_path / "straight" / "run")
    for name, grad_accum, nproc in (("two", 1, ["--nproc", "2"]), ("one", 2, [])):
        shutil.copytree(tmp_path / "crash", tmp_path / name, ignore=shutil.ignore_patterns("recipe.yaml"))
        path = recipe(name, grad_accum, save_every=2)
        resumed = _fitune("train", str(path), *nproc, "--resume", "--no-progress", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        losses = _losses(tmp_path / name / "run")
        assert [r["step"] for r in _rows(tmp_path / name / "run", "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
        if nproc:
            assert losses == reference
        else:
            assert losses == pytest.approx(reference, abs=1e-5)


def test_a_one_process_checkpoint_is_not_resumed_on_several(tmp_path):
    from fitune.errors import RunFolderError
    from fitune.session import build_session
    from fitune.trainer.checkpoint import load_checkpoint, save_checkpoint

    r = Recipe.model_validate(_recipe(tmp_path, "lora", grad_accum=1))
    session = build_session(r, with_tokenizer=False)
    save_checkpoint(session, tmp_path, step=1)
    session.ranks = 2
    with pytest.raises(
        RunFolderError, match="written by one process, and this run has 2; fix: resume it on one"
    ):
        load_checkpoint(session, tmp_path)
