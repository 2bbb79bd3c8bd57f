# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Faults injected into real runs: SIGKILL at seeded random points (some while a checkpoint is being written),
SIGTERM and SIGINT, a second signal during the save, a full disk, and an evaluation killed half-way.

Every interrupted run is continued with ``--resume auto`` and must end exactly where an uninterrupted run ends
(32-bit weights, so "exactly" means bit for bit, with LoRA dropout on), ``best/`` included. The training runs
are the real ``finetune/lora.py`` in subprocesses on the tiny model of ``test_finetune_lora.py``: 12 steps of a
few tens of milliseconds, a checkpoint after every step, a validation (loss, a sample generation and the
generation F1 of 2 validation questions) after steps 5, 10 and 12, so kills land during validations too and
resumes start right after a validated step.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO, evaluate_script
from safetensors.torch import load_file
from test_finetune_lora import prepared  # noqa: F401 (a module-scoped fixture: the tiny checkpoint and its data)
from test_training import make_samples
from test_training import run as fit_tiny

import lit_qa.evaluation.answering as answering
import lit_qa.evaluation.results as results
import lit_qa.training.signals as signals
from lit_qa.errors import LitQAError
from lit_qa.generation.generate import kv_cached
from lit_qa.training.args import TrainArgs
from lit_qa.training.resume import STATE_FILE, latest_checkpoint

STEPS = 12


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(run: Path, checkpoint: Path, data_dir: Path, *extra: str) -> subprocess.Popen:
    """Start (or continue: ``--resume auto``) a 12-step LoRA run in ``run``; its output goes to ``run.log``."""
    args = [
        "--data_dir", str(data_dir), "--checkpoint_dir", str(checkpoint), "--out_dir", str(run),
        "--precision", "32-true", "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
        "--train.max_steps", str(STEPS), "--train.warmup_steps", "1", "--train.save_interval", "1",
        "--train.learning_rate", "0.01", "--eval.interval", "5", "--eval.max_batches", "1",
        "--eval.num_samples", "1", "--eval.max_new_tokens", "4", "--eval.f1_questions", "2",
        "--eval.best_metric", "loss", "--lora.r", "4", "--lora.dropout", "0.05", "--resume", "auto", *extra,
    ]  # fmt: skip
    log = open(run.with_suffix(".log"), "a")  # noqa: SIM115 (closed by the child's exit; the parent's copy below)
    # A job started in the background (`cmd &`, nohup) inherits an ignored SIGINT, which training rightly leaves
    # alone; give the run a terminal's default so the SIGINT tests hold however the suite is launched.
    process = subprocess.Popen([sys.executable, str(REPO / "finetune/lora.py"), *args], stdout=log,
                               stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=default_sigint)  # fmt: skip
    log.close()
    return process


def finish(process: subprocess.Popen) -> int:
    """Wait for the process; return its exit status."""
    return process.wait(timeout=120)


def wait_for(process: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """Poll every millisecond until ``condition()`` holds (True) or the process has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError("the run neither reached the point nor ended")


def steps_done(run: Path) -> int:
    latest = latest_checkpoint(run)
    return int(latest.name.split("-")[1]) if latest else 0


def saving(run: Path, since: float = 0.0) -> bool:
    """A checkpoint's ``step-*.tmp`` folder (or the LoRA writer's ``step-*.tmp.tmp-<pid>``) exists, made after
    ``since`` (a ``time.time()``), so that one left by an earlier killed process does not count."""
    try:
        return any(entry.name.startswith("step-") and ".tmp" in entry.name and entry.stat().st_mtime >= since
                   for entry in os.scandir(run))  # fmt: skip
    except FileNotFoundError:  # the run folder is not there yet, or the .tmp was just renamed
        return False


def assert_latest_is_complete(run: Path) -> None:
    """Whatever was killed when, the checkpoint resume would pick is whole and loads."""
    latest = latest_checkpoint(run)
    if latest is not None:
        assert ".tmp" not in latest.name
        state = torch.load(latest / STATE_FILE, weights_only=True)
        assert state["progress"]["step"] == steps_done(run)
        assert load_file(latest / "lit_lora.safetensors")


def losses(run: Path) -> dict[int, float]:
    """Training loss by step from the CSV logs of every (resumed) process of a run."""
    found = {}
    for path in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            found.update({int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]})
    return found


def assert_same_weights(run: Path, reference: dict[str, torch.Tensor], folder: str = "final") -> None:
    weights = load_file(run / folder / "lit_lora.safetensors")
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(weights[key], tensor), key


def assert_same_best(run: Path, reference: Path) -> None:
    """``best/`` holds the same step, validation metrics and weights as the reference run's."""
    best = json.loads((run / "best" / "best.json").read_text())
    assert best == json.loads((reference / "best" / "best.json").read_text())
    assert_same_weights(run, load_file(reference / "best" / "lit_lora.safetensors"), folder="best")


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):  # noqa: F811
    _, checkpoint, data_dir, _ = prepared
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert finish(start(run, checkpoint, data_dir)) == 0, run.with_suffix(".log").read_text()
    return run, load_file(run / "final" / "lit_lora.safetensors")


def test_sigkill_at_random_points_and_mid_save_then_resume_gives_the_uninterrupted_weights(
    prepared, uninterrupted, tmp_path  # noqa: F811
):
    _, checkpoint, data_dir, _ = prepared
    run = tmp_path / "run"
    rng = random.Random(2024)
    kills = []  # (point, whether the killed process left its .tmp folder behind)
    points = ["mid-save", "between saves", "mid-save", "between saves"]
    while points:
        point = points.pop(0)
        started = time.time()
        process = start(run, checkpoint, data_dir)
        if point == "mid-save":  # as soon as a checkpoint folder of this process appears
            reached = wait_for(process, lambda: saving(run, started))
        else:  # a random moment in the step, the save or the validation after a random checkpoint
            target = min(steps_done(run) + rng.randint(1, 2), STEPS - 1)
            reached = wait_for(process, lambda: steps_done(run) >= target)
            time.sleep(rng.uniform(0, 0.2))
        assert reached, f"the run ended before the {point} kill"
        process.kill()
        assert process.wait() == -signal.SIGKILL
        kills.append((point, saving(run, started)))
        assert_latest_is_complete(run)  # a half-written step-*.tmp is never the one to resume from
        if not points and not any(left for _, left in kills) and len(kills) < 7:
            points.append("mid-save")  # every kill landed just after a save: try again
    assert any(left for _, left in kills), "no kill landed while a checkpoint was being written"
    assert finish(start(run, checkpoint, data_dir)) == 0
    assert run.with_suffix(".log").read_text().count("Resumed from") >= 2
    assert_same_weights(run, uninterrupted[1])
    assert_same_best(run, uninterrupted[0])
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]  # leftovers cleaned when the step is saved again
    print(f"\nSIGKILL at: {kills} (point, .tmp left behind)")


def test_sigterm_sigint_and_a_second_signal_mid_save_then_resume_gives_the_uninterrupted_weights(
    prepared, uninterrupted, tmp_path  # noqa: F811
):
    _, checkpoint, data_dir, _ = prepared
    run = tmp_path / "run"
    for signum, status in ((signal.SIGTERM, 0), (signal.SIGINT, 130)):
        before = steps_done(run)
        process = start(run, checkpoint, data_dir)
        assert wait_for(process, lambda: steps_done(run) > before)
        process.send_signal(signum)
        assert finish(process) == status
        last_line = run.with_suffix(".log").read_text().strip().splitlines()[-1]
        step = steps_done(run)
        assert last_line == (f"stopped by {signum.name} at step {step}/{STEPS}; saved {run / f'step-{step:06d}'}; "
                             "continue with --resume auto")  # fmt: skip
        assert before < step < STEPS and not (run / "final").exists()  # stopped early, nothing passed off as final
        assert_latest_is_complete(run)

    # A second SIGTERM while the checkpoint is being written stops at once (the default action), leaving its
    # .tmp folder. Tried again if the save was over before the poll saw it.
    outcomes = []
    while not any(status == -signal.SIGTERM and left for status, left in outcomes) and len(outcomes) < 3:
        before, started = steps_done(run), time.time()
        process = start(run, checkpoint, data_dir)
        assert wait_for(process, lambda: steps_done(run) > before)
        process.send_signal(signal.SIGTERM)
        if wait_for(process, lambda: saving(run, started)):
            process.send_signal(signal.SIGTERM)
        outcomes.append((finish(process), saving(run, started)))
        assert outcomes[-1][0] in (0, -signal.SIGTERM)
        assert_latest_is_complete(run)
    assert any(status == -signal.SIGTERM and left for status, left in outcomes), outcomes

    assert finish(start(run, checkpoint, data_dir)) == 0
    assert_same_weights(run, uninterrupted[1])
    assert_same_best(run, uninterrupted[0])
    # The losses logged by the processes that stopped cleanly are those of the uninterrupted run.
    reference = losses(uninterrupted[0])
    logged = losses(run)
    assert len(logged) >= STEPS // 2 and all(logged[step] == reference[step] for step in logged)
    print(f"\nsecond SIGTERM: {outcomes} (exit status, .tmp left behind)")


def test_sigterm_to_rank_0_stops_every_process_at_the_same_step_and_resume_is_exact(prepared, tmp_path):  # noqa: F811
    """Two processes (DDP on gloo): only rank 0 is signalled (``kill <pid>``); rank 1 learns it through the
    per-step all-reduce, so both save the same step and exit instead of one waiting for the other forever.

    Resumed, the run ends with the weights of an uninterrupted 2-process run. Without padding to a multiple
    the two ranks' micro-batches have different shapes, so their dropout streams part ways: each rank's RNG
    state must be saved, not only rank 0's."""
    _, checkpoint, data_dir, _ = prepared
    ddp = ("--devices", "2", "--strategy", "ddp", "--train.pad_multiple", "1")
    reference = tmp_path / "reference"
    assert finish(start(reference, checkpoint, data_dir, *ddp)) == 0
    run = tmp_path / "run"
    process = start(run, checkpoint, data_dir, *ddp)
    assert wait_for(process, lambda: steps_done(run) >= 2)
    process.send_signal(signal.SIGTERM)
    assert finish(process) == 0
    step = steps_done(run)
    assert f"stopped by SIGTERM at step {step}/{STEPS}" in run.with_suffix(".log").read_text()
    assert step < STEPS and not (run / "final").exists()
    assert_latest_is_complete(run)
    assert finish(start(run, checkpoint, data_dir, *ddp)) == 0
    assert_same_weights(run, load_file(reference / "final" / "lit_lora.safetensors"))
    assert_same_best(run, reference)


def test_two_runs_with_the_same_seed_log_the_same_losses(prepared, uninterrupted, tmp_path):  # noqa: F811
    _, checkpoint, data_dir, _ = prepared
    run = tmp_path / "run"
    assert finish(start(run, checkpoint, data_dir)) == 0
    assert list(losses(run).items()) == list(losses(uninterrupted[0]).items())
    assert len(losses(run)) == STEPS
    assert_same_weights(run, uninterrupted[1])


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=4, warmup_steps=0, save_interval=2)
    real_save = L.Fabric.save

    def save_half_then_fail(fabric, path, state, **kwargs):
        if Path(path).parent.name == "step-000004.tmp":
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(fabric, path, state, **kwargs)

    monkeypatch.setattr(L.Fabric, "save", save_half_then_fail)
    with pytest.raises(LitQAError) as error:
        fit_tiny(tmp_path, args, samples=make_samples(8))
    assert str(error.value) == (
        f"cannot write checkpoint {tmp_path / 'step-000004'}: No space left on device; the last complete checkpoint"
        f" is {tmp_path / 'step-000002'} (free space, then continue with --resume auto)"
    )
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000002"]  # the .tmp is gone
    assert latest_checkpoint(tmp_path).name == "step-000002"
    state = torch.load(tmp_path / "step-000002" / STATE_FILE, weights_only=True)
    assert state["progress"]["step"] == 2
    monkeypatch.undo()
    fit_tiny(tmp_path, args, samples=make_samples(8), resume="auto")  # space is back: the run finishes
    assert latest_checkpoint(tmp_path).name == "step-000004"


def test_signal_handlers_record_the_first_signal_pass_on_the_second_and_are_restored():
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under nohup
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with signals.signals_caught() as received:
            assert all(signal.getsignal(s) is not handler for s, handler in before.items())
            signal.raise_signal(signal.SIGINT)
            assert received == [signal.SIGINT]  # recorded, not raised
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)  # the user insists: the previous handler runs
        assert all(signal.getsignal(s) is handler for s, handler in before.items())
    finally:
        signal.signal(signal.SIGINT, outer)


def test_an_ignored_signal_stays_ignored():
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `nohup` and `cmd &` hand a process
    try:
        with signals.signals_caught():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


# ---- evaluation ----


def evaluate_args(checkpoint: Path, eval_file: Path, out_dir: Path) -> list[str]:
    return ["--checkpoint_dir", str(checkpoint), "--eval_file", str(eval_file), "--out_dir", str(out_dir),
            "--batch_size", "1", "--max_new_tokens", "4", "--device", "cpu", "--precision", "32-true"]  # fmt: skip


def spy_on_decoding(monkeypatch, crash_after: int | None = None) -> list[int]:
    """Let evaluation decode as usual, counting the prompts it decodes; raise once ``crash_after`` are done."""
    prompts: list[int] = []

    def spy(model, batch, *args, **kwargs):
        if crash_after is not None and sum(prompts) >= crash_after:
            raise RuntimeError("simulated crash")
        prompts.append(len(batch))
        return kv_cached(model, batch, *args, **kwargs)

    monkeypatch.setattr(answering, "kv_cached", spy)
    return prompts


def evaluate_in_process(checkpoint: Path, eval_file: Path, out_dir: Path, **overrides) -> dict:
    settings = dict(batch_size=1, max_new_tokens=4, device="cpu", precision="32-true") | overrides
    return evaluate_script("evaluate/base.py", checkpoint_dir=checkpoint, eval_file=eval_file, out_dir=out_dir,
                           **settings)  # fmt: skip


def answer_lines(out_dir: Path) -> int:
    path = out_dir / results.PARTIAL_FILE
    return path.read_bytes().count(b"\n") - 1 if path.is_file() else 0


def test_evaluation_killed_midway_answers_only_the_rest_when_run_again(
    prepared, tmp_path, monkeypatch, capsys  # noqa: F811
):
    _, checkpoint, _, train_file = prepared  # 32 questions
    evaluate_in_process(checkpoint, train_file, tmp_path / "reference")
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "evaluate/base.py"), *evaluate_args(checkpoint, train_file, out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    assert wait_for(process, lambda: answer_lines(out) >= 5), "the evaluation ended before the kill"
    process.kill()
    process.wait()
    done = answer_lines(out)
    assert 5 <= done < 32 and not (out / "predictions.json").exists()  # nothing passed off as complete

    capsys.readouterr()
    prompts = spy_on_decoding(monkeypatch)
    evaluate_in_process(checkpoint, train_file, out)
    assert f"resuming {done} of 32 answers" in capsys.readouterr().err
    assert sum(prompts) == 32 - done  # only the rest was answered
    for name in ("predictions.json", "na_probs.json", "best_spans.json"):
        assert (out / name).read_text() == (tmp_path / "reference" / name).read_text(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_answers"] == done and not (out / results.PARTIAL_FILE).exists()


def test_a_torn_last_line_is_dropped_and_partial_answers_of_other_settings_are_ignored(
    prepared, tmp_path, monkeypatch, capsys  # noqa: F811
):
    _, checkpoint, _, train_file = prepared  # 32 questions
    out = tmp_path / "out"
    spy_on_decoding(monkeypatch, crash_after=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_in_process(checkpoint, train_file, out)
    with open(out / results.PARTIAL_FILE, "a") as partial:
        partial.write('{"id": "a7q3", "ans')  # a line cut short by a kill

    prompts = spy_on_decoding(monkeypatch, crash_after=3)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_in_process(checkpoint, train_file, out)
    assert "resuming 5 of 32 answers" in capsys.readouterr().err and sum(prompts) == 3
    assert answer_lines(out) == 8  # the torn line is gone, the new answers follow the old ones

    prompts = spy_on_decoding(monkeypatch)
    evaluate_in_process(checkpoint, train_file, out, max_new_tokens=5)  # other settings: never mixed, start over
    err = capsys.readouterr().err
    assert "warning: ignoring" in err and "(differs in: max_new_tokens)" in err and "resuming" not in err
    assert sum(prompts) == 32
