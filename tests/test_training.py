# Copyright lit-qa authors. Licensed under the Apache License 2.0.
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import MixedPrecision

import lit_qa.training.batches as batches
import lit_qa.training.loop as loop
import lit_qa.training.loss as training_loss
import lit_qa.training.optimizer as optimizer_step
import lit_qa.training.resume as checkpointing
import lit_qa.training.validation as validation
from lit_qa.errors import LitQAError
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.model import GPT
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.batches import epoch_global_batches, split_global_batch
from lit_qa.training.loop import fit
from lit_qa.training.optimizer import lr_factor
from lit_qa.training.progress import Progress
from lit_qa.training.resume import latest_checkpoint

TOKENIZER = SimpleNamespace(eos_id=1, eos_ids={1}, decode=lambda ids: " ".join(map(str, ids.tolist())))


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """Random prompts of varying length followed by a 2-4 token answer (the only positions with loss)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = int(torch.randint(6, 20, (1,), generator=generator))
        answer = int(torch.randint(2, 5, (1,), generator=generator))
        ids = torch.randint(2, 100, (length,), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[-answer:] = ids[-answer:]
        samples.append({"id": f"q{i}", "input_ids": ids, "labels": labels})
    return samples


def run(tmp_path: Path, train_args: TrainArgs, lora: bool = False, resume=False, samples=None, seed: int = 0,
        optimizer_class=torch.optim.AdamW, eval_args: EvalArgs | None = None,
        fabric: L.Fabric | None = None):  # fmt: skip
    """Fit a tiny model from a fixed initialisation, handed over in eval mode as `load_model` returns it; return it."""
    fabric = fabric or L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(seed)
    model = GPT(Config.from_name("tiny-gqa"))
    if lora:
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, query=True, value=True, mlp=True))
        mark_only_lora_as_trainable(model)
        torch.manual_seed(seed)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)  # non-zero B so LoRA changes the output from step 1
    model = fabric.setup_module(model.eval())
    optimizer = fabric.setup_optimizers(
        optimizer_class([p for p in model.parameters() if p.requires_grad], lr=train_args.learning_rate)
    )
    data = samples if samples is not None else make_samples(16)
    eval_args = eval_args or EvalArgs(interval=1000, max_batches=2, num_samples=0)
    saved = []
    fit(fabric, model, optimizer, data, data[:4], train_args, eval_args, tmp_path, saved.append, TOKENIZER,
        resume=resume, seed=seed)  # fmt: skip
    return model.module


def test_a_tiny_model_overfits_a_tiny_set(tmp_path):
    samples = make_samples(8)
    args = TrainArgs(global_batch_size=8, micro_batch_size=4, max_steps=60, learning_rate=1e-2, warmup_steps=0,
                     lr_schedule="constant", save_interval=1000)  # fmt: skip
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(0)
    before = validation.validation_metrics(fabric, GPT(Config.from_name("tiny-gqa")), samples, 4, max_batches=2)["loss"]
    model = run(tmp_path, args, samples=samples)
    after = validation.validation_metrics(fabric, model, samples, 4, max_batches=2)["loss"]
    assert before > 4.0 and after < 0.2


def test_accumulating_micro_batches_equals_one_big_batch(tmp_path):
    """Summed token losses over the global batch's token count: exact whatever the micro-batch split.

    Plain SGD, so the weights move by exactly lr x gradient (Adam would amplify float rounding in tiny gradients).
    """
    common = dict(global_batch_size=8, max_steps=2, learning_rate=1.0, warmup_steps=0, save_interval=1000)
    one_batch = run(tmp_path / "a", TrainArgs(micro_batch_size=8, **common), optimizer_class=torch.optim.SGD)
    accumulated = run(tmp_path / "b", TrainArgs(micro_batch_size=2, **common), optimizer_class=torch.optim.SGD)
    torch.manual_seed(0)
    initial = GPT(Config.from_name("tiny-gqa")).state_dict()
    assert not torch.equal(initial["lm_head.weight"], one_batch.state_dict()["lm_head.weight"])
    for (name, a), (_, b) in zip(one_batch.state_dict().items(), accumulated.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("switch", [dict(group_by_length=False), dict(pad_multiple=1), dict(loss_positions_only=False)])
def test_speed_switches_do_not_change_the_trained_weights(tmp_path, switch):
    """Length grouping, padding to a multiple and the loss-positions-only head are speed-ups only."""
    common = dict(global_batch_size=8, micro_batch_size=2, max_steps=2, learning_rate=1.0, warmup_steps=0,
                  save_interval=1000, pad_multiple=16)  # fmt: skip
    default = run(tmp_path / "a", TrainArgs(**common), optimizer_class=torch.optim.SGD)
    switched = run(tmp_path / "b", TrainArgs(**{**common, **switch}), optimizer_class=torch.optim.SGD)
    for (name, a), (_, b) in zip(default.state_dict().items(), switched.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


class Interrupt(Exception):
    pass


@contextmanager
def crash_after_saving(monkeypatch: pytest.MonkeyPatch, step_dir_name: str) -> Iterator[None]:
    """Make `fit` raise `Interrupt` right after it saves ``step_dir_name`` (as a kill just after that save
    would), expect it, and restore the real save function on exit."""
    original_save = loop.save_training_checkpoint

    def save_then_crash(fabric, step_dir, *rest):
        original_save(fabric, step_dir, *rest)
        if step_dir.name == step_dir_name:
            raise Interrupt

    monkeypatch.setattr(loop, "save_training_checkpoint", save_then_crash)
    try:
        with pytest.raises(Interrupt):
            yield
    finally:
        monkeypatch.setattr(loop, "save_training_checkpoint", original_save)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("eval_interval", [1000, 3])
def test_a_run_stopped_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch, eval_interval):
    """LoRA dropout on and the model handed over in eval mode: the resumed run, which skips the fresh start's
    check, must still train with dropout. With ``eval_interval`` 3 it also validates (with sample generations)
    at the step it was stopped at."""
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=8, learning_rate=1e-2, warmup_steps=2,
                     save_interval=3)  # fmt: skip
    eval_args = EvalArgs(interval=eval_interval, max_batches=1, num_samples=1, max_new_tokens=2)
    uninterrupted = run(tmp_path / "full", args, lora=True, eval_args=eval_args)

    with crash_after_saving(monkeypatch, "step-000003"):
        run(tmp_path / "stopped", args, lora=True, eval_args=eval_args)
    assert latest_checkpoint(tmp_path / "stopped").name == "step-000003"
    # A different seed for initialisation proves the weights come from the checkpoint, not the seed.
    resumed = run(tmp_path / "stopped", args, lora=True, resume=True, eval_args=eval_args)
    assert_same_weights(uninterrupted, resumed)


def test_validation_does_not_change_the_trained_weights(tmp_path, monkeypatch):
    """Validation only observes the run: validating with sample generations after every step ends with the
    weights of a run that never validates, with dropout on, even when decoding draws from the global RNG."""
    real_generate = validation.generate

    def sampling_generate(*args, **kwargs):
        torch.rand(100)  # what a sampling decoder does to the global RNG
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(validation, "generate", sampling_generate)
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=4, learning_rate=1e-2, warmup_steps=0,
                     save_interval=1000)  # fmt: skip
    quiet = EvalArgs(interval=1000, max_batches=1, num_samples=0)
    chatty = EvalArgs(interval=1, max_batches=1, num_samples=2, max_new_tokens=2)
    assert_same_weights(run(tmp_path / "a", args, lora=True, eval_args=quiet),
                        run(tmp_path / "b", args, lora=True, eval_args=chatty))  # fmt: skip


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=6, warmup_steps=0, save_interval=2)
    original = training_loss.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, *args):
        calls["n"] += model.training  # validation passes do not count
        loss = original(model, batch, *args)
        return loss * float("nan") if calls["n"] > 6 else loss  # steps 1-3 are fine (2 micro-batches each)

    monkeypatch.setattr(training_loss, "token_loss_sum", poisoned)
    with pytest.raises(optimizer_step.NonFiniteLossError, match=r"step 4.*step-000002"):
        run(tmp_path, args)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert (tmp_path / "step-000002" / checkpointing.STATE_FILE).is_file()


def test_skip_policy_ignores_the_bad_step(tmp_path, monkeypatch):
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=3, warmup_steps=0, nan_policy="skip")
    monkeypatch.setattr(training_loss, "token_loss_sum",
                        lambda model, batch, *args: model(batch["input_ids"]).sum() * float("nan"))
    model = run(tmp_path, args)
    torch.manual_seed(0)
    initial = GPT(Config.from_name("tiny-gqa"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.state_dict().values()))


def test_half_written_checkpoint_is_never_the_latest(tmp_path):
    (tmp_path / "step-000004").mkdir()
    (tmp_path / "step-000008.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000004"
    with pytest.raises(LitQAError, match="no checkpoint"):
        checkpointing.find_resume_checkpoint(tmp_path / "empty", True)
    assert checkpointing.find_resume_checkpoint(tmp_path / "empty", "auto") is None


def test_progress_is_recorded_as_the_plain_dict_checkpoints_always_held():
    """A checkpoint written before `Progress` existed (a dict of these keys, in this order) resumes, and a new one
    holds the same dict; a key of a later version is ignored, a missing one keeps its default."""
    best = {"step": 2, "criterion": "val loss on 1 batches", "metric": "loss", "value": 1.4, "val": {"loss": 1.4}}
    saved = {"step": 3, "epoch": 1, "step_in_epoch": 0, "tokens": 96, "val_loss": 1.5, "val": {"loss": 1.5},
             "best": best}  # fmt: skip
    progress = Progress.from_state(saved)
    assert progress.best_step == 2 and progress.val == {"loss": 1.5}
    assert progress.to_state() == saved and list(progress.to_state()) == list(saved)
    assert Progress.from_state({"step": 2, "from_a_later_version": 1}) == Progress(step=2)


def test_epoch_order_is_deterministic_covers_every_sample_and_groups_lengths():
    lengths = torch.randint(5, 500, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    batches = epoch_global_batches(lengths, 100, seed=1, epoch=0)
    assert batches == epoch_global_batches(lengths, 100, seed=1, epoch=0)
    assert batches != epoch_global_batches(lengths, 100, seed=1, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padding = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    grouped = [m for b in batches for m in split_global_batch(b, lengths, 4, group_by_length=True)]
    plain = [m for b in batches for m in split_global_batch(b, lengths, 4, group_by_length=False)]
    assert sorted(map(sorted, grouped)) != sorted(map(sorted, plain))
    assert padding(grouped) < 0.2 * padding(plain)


def test_ranks_split_each_step_and_agree_on_its_token_count():
    lengths = list(range(10, 42))
    counts = [3] * 32
    args = TrainArgs(global_batch_size=8, micro_batch_size=2)
    ranks = [batches.rank_batches_of_epoch(lengths, counts, args, 0, seed=0, world_size=2, rank=r) for r in (0, 1)]
    for (micro_0, tokens_0), (micro_1, tokens_1), full in zip(*ranks, epoch_global_batches(lengths, 8, 0, 0)):
        assert tokens_0 == tokens_1 == 24
        assert sorted(i for m in micro_0 + micro_1 for i in m) == sorted(full)
        assert len(micro_0) == len(micro_1) == 2


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    args = TrainArgs(learning_rate=1e-3, min_lr=1e-4, warmup_steps=10)
    factors = [lr_factor(step, args, total_steps=110) for step in range(111)]
    assert factors[0] < factors[5] < factors[9] <= 1.0
    assert factors[10] == pytest.approx(1.0)
    assert factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_out_of_range_train_args_are_refused_together():
    with pytest.raises(LitQAError) as error:
        TrainArgs(global_batch_size=6, micro_batch_size=4, learning_rate=-1).validate(world_size=1)
    assert "learning_rate" in str(error.value) and "multiple of micro_batch_size" in str(error.value)


def test_time_budget_stops_with_a_checkpoint_and_resume_finishes(tmp_path):
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=5, save_interval=100, max_time_minutes=1e-9)
    run(tmp_path, args)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    args.max_time_minutes = None
    run(tmp_path, args, resume="auto")
    assert latest_checkpoint(tmp_path).name == "step-000005"


def test_sample_generations_skip_prompts_too_long_to_continue(tmp_path, capsys):
    samples = make_samples(8)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = GPT(Config.from_name("tiny-gqa"))
    model.max_seq_length = max(len(s["input_ids"]) for s in samples)  # the longest prompt leaves no room
    validation.print_sample_generations(fabric, model, samples, TOKENIZER, EvalArgs(num_samples=8, max_new_tokens=4))
    printed = capsys.readouterr().out
    fitting = [s for s in samples if int((s["labels"] == -100).sum()) + 4 <= model.max_seq_length]
    assert 0 < printed.count("generated") == len(fitting) < len(samples)


def loss_and_grads(model: GPT, batch: dict, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = training_loss.token_loss_sum(model, batch, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tiny_lora_model_and_batch() -> tuple[GPT, dict]:
    torch.manual_seed(0)
    model = GPT(Config.from_name("tiny-gqa"))
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, value=True, mlp=True))
    mark_only_lora_as_trainable(model)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    from lit_qa.data.dataset import collate

    return model, collate(make_samples(4), pad_id=0, max_length=64, pad_multiple=8)


def test_head_at_loss_positions_only_gives_the_loss_and_gradients_of_the_full_head():
    model, batch = tiny_lora_model_and_batch()
    loss_fast, grads_fast = loss_and_grads(model, batch, loss_positions_only=True)
    loss_full, grads_full = loss_and_grads(model, batch, loss_positions_only=False)
    assert loss_fast > 0 and grads_fast.keys() == grads_full.keys() and grads_fast
    torch.testing.assert_close(loss_fast, loss_full)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_fast[name], grad, msg=name)


def test_compiled_blocks_give_the_loss_and_gradients_of_eager_blocks():
    model, batch = tiny_lora_model_and_batch()
    loss_eager, grads_eager = loss_and_grads(model, batch)
    loop.compile_blocks(model)
    loss_compiled, grads_compiled = loss_and_grads(model, batch)
    assert all(block._compiled_call_impl is not None for block in model.transformer.h)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def count_saved_tensors(model: GPT, batch: dict) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        training_loss.token_loss_sum(model, batch)
    return len(saved)


def test_activation_checkpointing_gives_the_loss_and_gradients_of_stored_activations():
    model, batch = tiny_lora_model_and_batch()
    loss_stored, grads_stored = loss_and_grads(model, batch)
    stored, keys = count_saved_tensors(model, batch), list(model.state_dict())
    loop.checkpoint_blocks(model)
    loss_recomputed, grads_recomputed = loss_and_grads(model, batch)
    assert count_saved_tensors(model, batch) < stored / 3  # the blocks keep almost nothing for backward
    torch.testing.assert_close(loss_recomputed, loss_stored)
    for name, grad in grads_stored.items():
        torch.testing.assert_close(grads_recomputed[name], grad, msg=name)
    assert list(model.state_dict()) == keys  # checkpoints stay loadable


# ---- fp16 loss scaling (--precision 16-mixed) ----


def fp16_fabric(init_scale: float) -> L.Fabric:
    """16-mixed with a real GradScaler, on the CPU: Fabric turns the "16-mixed" string into bf16-mixed on CPUs,
    so the plugin is passed explicitly. A big initial scale makes the first steps' scaled fp16 gradients
    overflow, as they do at the start of real fp16 runs."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return L.Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


def test_fp16_overflow_skips_the_step_and_lowers_the_scale_instead_of_stopping(tmp_path):
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=8, learning_rate=1e-2, warmup_steps=0,
                     save_interval=1000)  # fmt: skip
    fabric = fp16_fabric(init_scale=2.0**24)
    model = run(tmp_path, args, fabric=fabric)  # the default nan_policy is "stop"
    skipped = math.log2(2.0**24 / fabric.strategy.precision.scaler.get_scale())  # each overflow halves the scale
    assert skipped == int(skipped) and 0 < skipped < args.max_steps
    torch.manual_seed(0)
    initial = GPT(Config.from_name("tiny-gqa")).state_dict()
    assert not torch.equal(initial["lm_head.weight"], model.state_dict()["lm_head.weight"])  # the other steps ran


@pytest.mark.parametrize("nan_policy", ["stop", "skip"])
def test_fp16_nan_loss_still_obeys_the_nan_policy(tmp_path, monkeypatch, nan_policy):
    """A NaN loss is no overflow; with "skip" the scaler's step is closed, so the next step can unscale again."""
    original = training_loss.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, batch, *args):
        calls["n"] += model.training
        loss = original(model, batch, *args)
        return loss * float("nan") if calls["n"] in (3, 4) else loss  # step 2 of 4 (2 micro-batches each)

    monkeypatch.setattr(training_loss, "token_loss_sum", poisoned)
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=4, warmup_steps=0, save_interval=1000,
                     nan_policy=nan_policy)  # fmt: skip
    fabric = fp16_fabric(init_scale=2.0**8)  # small enough never to overflow
    if nan_policy == "stop":
        with pytest.raises(optimizer_step.NonFiniteLossError, match="loss nan .* at step 2"):
            run(tmp_path, args, fabric=fabric)
    else:
        run(tmp_path, args, fabric=fabric)
        assert calls["n"] == 8  # every step ran


def test_fp16_loss_scale_is_saved_and_restored_on_resume(tmp_path, monkeypatch):
    """A resumed run that started its scaler over would overflow (and skip) its first steps again."""
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=8, learning_rate=1e-2, warmup_steps=0,
                     save_interval=4)  # fmt: skip
    fabric = fp16_fabric(init_scale=2.0**24)
    uninterrupted = run(tmp_path / "full", args, lora=True, fabric=fabric)
    final_scale = fabric.strategy.precision.scaler.get_scale()

    with crash_after_saving(monkeypatch, "step-000004"):
        run(tmp_path / "stopped", args, lora=True, fabric=fp16_fabric(init_scale=2.0**24))
    saved = torch.load(tmp_path / "stopped" / "step-000004" / checkpointing.STATE_FILE, weights_only=True)
    assert saved["precision"]["scale"] < 2.0**24
    fabric = fp16_fabric(init_scale=2.0**24)
    resumed = run(tmp_path / "stopped", args, lora=True, resume=True, fabric=fabric)
    assert fabric.strategy.precision.scaler.get_scale() == final_scale
    assert_same_weights(uninterrupted, resumed)


def test_out_of_range_eval_args_are_refused_together():
    with pytest.raises(LitQAError) as error:
        EvalArgs(interval=0, f1_questions=-1).validate()
    assert "--eval.interval" in str(error.value) and "--eval.f1_questions" in str(error.value)
    with pytest.raises(LitQAError, match="best_metric f1 needs --eval.f1_questions"):
        EvalArgs(best_metric="f1").validate()
    assert EvalArgs().tracked_metric() is None and EvalArgs(f1_questions=5).tracked_metric() == "f1"
    assert EvalArgs(f1_questions=5, best_metric="loss").tracked_metric() == "loss"
