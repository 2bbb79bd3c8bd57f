# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""The learned no-answer head: where its gradient goes, that it learns a planted answerability signal and not
noise, that its logits from the decoding prefill equal a plain forward, that saving and loading it and resuming
a run with it are exact, and how the no-answer rule and threshold are tuned with it."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import make_tiny_tokenizer, run_script
from test_evaluation import make_question, sample_questions
from test_extractive import tiny_model
from test_finetune_lora import finetune, prepared  # noqa: F401 (prepared: a module-scoped fixture)
from test_training import TOKENIZER, assert_same_weights, crash_after_saving

import lit_qa.training.loop as loop
import lit_qa.training.loss as training_loss
from lit_qa.checkpoints.na_head import (
    NA_HEAD_CONFIG_FILE,
    NA_HEAD_WEIGHTS_FILE,
    load_na_head,
    na_head_files,
    split_na_head,
)
from lit_qa.data.dataset import collate, mark_unanswerable
from lit_qa.errors import LitQAError
from lit_qa.evaluation.answering import score_questions
from lit_qa.evaluation.answers import Answers
from lit_qa.evaluation.calibration import best_na_rule, roc_auc, tune_na_rules
from lit_qa.evaluation.decoding import DecodingSettings
from lit_qa.evaluation.squad_metric import evaluate_predictions
from lit_qa.generation.generate import kv_cached, prefill
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.model import GPT
from lit_qa.models.na_head import (
    NAHeadConfig,
    attach_na_head,
    default_layers,
    last_prompt_positions,
    na_loss_sum,
)
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.launch import standardize_na_head

MARK, NO_ANSWER_ID, EOS = 3, 2, 1  # token ids of the tiny random vocabulary (TOKENIZER's EOS is 1)


def answerability_samples(n: int, seed: int, planted: bool = True) -> list[dict]:
    """Random prompts, every second one unanswerable (target: the no-answer token, then EOS). With ``planted`` an
    unanswerable prompt holds MARK at a random position and an answerable one never does; without, the prompts
    are drawn the same way for both kinds, so nothing in them tells the kinds apart."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        unanswerable = i % 2 == 1
        prompt = torch.randint(4, 100, (int(torch.randint(6, 16, (1,), generator=generator)),), generator=generator)
        if planted and unanswerable:
            prompt[int(torch.randint(0, len(prompt), (1,), generator=generator))] = MARK
        answer = torch.tensor([NO_ANSWER_ID, EOS]) if unanswerable else torch.cat(
            [torch.randint(4, 100, (2,), generator=generator), torch.tensor([EOS])])  # fmt: skip
        ids = torch.cat([prompt, answer])
        labels = torch.cat([torch.full_like(prompt, -100), answer])
        samples.append({"id": f"q{i}", "input_ids": ids, "labels": labels})
    mark_unanswerable(samples, torch.tensor([NO_ANSWER_ID, EOS]))
    return samples


def lora_model_with_head(seed: int = 0, config: NAHeadConfig | None = None) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config.from_name("tiny-gqa"))
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, query=True, value=True, mlp=True))
    mark_only_lora_as_trainable(model)
    attach_na_head(model, config or NAHeadConfig())
    return model


def train(tmp_path, model: GPT, samples: list[dict], train_args: TrainArgs, resume=False) -> GPT:
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = fabric.setup_module(model.eval())
    optimizer = fabric.setup_optimizers(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_args.learning_rate)
    )
    eval_args = EvalArgs(interval=1000, max_batches=2, num_samples=0)
    loop.fit(fabric, model, optimizer, samples, samples[:4], train_args, eval_args, tmp_path, lambda folder: None,
                 TOKENIZER, resume=resume)  # fmt: skip
    return model.module


@torch.no_grad()
def head_auc(model: GPT, samples: list[dict]) -> float:
    model.eval()
    batch = collate(samples, 0)
    _, logits = model(batch["input_ids"], na_positions=last_prompt_positions(batch["labels"]))
    return roc_auc(logits.tolist(), [bool(s["unanswerable"]) for s in samples])


def test_mark_unanswerable_reads_the_target_and_collate_stacks_the_labels():
    samples = answerability_samples(6, seed=0)
    assert [s["unanswerable"] for s in samples] == [False, True] * 3
    batch = collate(samples, 0)
    assert batch["unanswerable"].tolist() == [0.0, 1.0] * 3
    # The position before the first answer token is the last prompt token.
    positions = last_prompt_positions(batch["labels"])
    for row, sample in enumerate(samples):
        assert int(positions[row]) == int((sample["labels"] == -100).sum()) - 1


def test_default_layers_sit_in_the_middle():
    assert default_layers(30) == [15, 17, 19]
    assert default_layers(32) == [16, 18, 20]
    assert default_layers(2) == [0, 1] and default_layers(1) == [0]
    with pytest.raises(LitQAError, match="below the model's 2 blocks"):
        NAHeadConfig(layers=[5]).resolved(2)
    with pytest.raises(LitQAError, match="loss_weight must be >= 0"):
        NAHeadConfig(loss_weight=-1)


def test_the_head_gradient_reaches_only_the_head_and_the_trained_adapter():
    model = lora_model_with_head()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)  # non-zero B, so lora_A gets a gradient too
    batch = collate(answerability_samples(4, seed=1), 0)
    _, logits = training_loss.loss_sums(model, batch)
    na_loss_sum(logits, batch["unanswerable"]).backward()  # the head's term alone
    last = max(model.na_head.layers)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name
        elif name.startswith("na_head.") or (name.startswith("transformer.h.") and int(name.split(".")[2]) <= last):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("planted", [True, False])
def test_a_planted_answerability_signal_is_learned_and_noise_is_not(tmp_path, planted):
    """Every weight trains (full fine-tuning): the tiny model must learn to look back for the mark, which a rank-4
    LoRA on two 32-wide layers does only partly in this budget."""
    samples = answerability_samples(640, seed=0, planted=planted)
    held_out = answerability_samples(64, seed=1, planted=planted)
    model = lora_model_with_head().requires_grad_(True)
    args = TrainArgs(global_batch_size=16, micro_batch_size=8, max_steps=100, learning_rate=1e-2, warmup_steps=0,
                     lr_schedule="constant", save_interval=1000)  # fmt: skip
    model = train(tmp_path, model, samples, args)
    auc = head_auc(model, held_out)
    if planted:
        assert auc > 0.95
    else:
        assert 0.25 < auc < 0.75  # 64 held-out questions: chance is 0.5 +- 0.07


def test_the_prefill_logits_equal_a_plain_forward_of_each_prompt():
    """Left-padded batched prefill (generation) and a right-padded training batch see the same last prompt token."""
    model = tiny_model(seed=2)
    attach_na_head(model, NAHeadConfig(hidden_size=8))
    torch.nn.init.normal_(model.na_head.proj[0].weight, std=1.0)
    prompts = [torch.randint(4, 100, (n,)) for n in (5, 11, 8)]
    with kv_cached(model, prompts, room=2, pad_multiple=16) as layout:
        _, head = prefill(model, layout, na_head=True)
    with torch.no_grad():
        alone = [float(model(p[None], na_positions=torch.tensor([len(p) - 1]))[1]) for p in prompts]
    torch.testing.assert_close(head, torch.tensor(alone), atol=1e-5, rtol=1e-5)
    assert len(set(round(x, 3) for x in alone)) == 3  # the rows differ: the test can see a mix-up


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer(make_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_saving_and_loading_the_head_reproduces_p_na_exactly(tmp_path, tokenizer):
    questions = sample_questions()
    model = tiny_model(seed=1, tokenizer=tokenizer)
    attach_na_head(model, NAHeadConfig(layers=[1], hidden_size=4))
    for parameter in model.na_head.parameters():
        torch.nn.init.normal_(parameter, std=1.0)
    before = score_questions(model, tokenizer, questions, DecodingSettings(extractive=True), progress=False)
    assert all(set(logits) == {"head", "span"} for logits in before.na_logits.values())
    assert before.na_prob == before.with_source("head", questions).na_prob  # the head's rule by default
    for name, content in na_head_files(model).items():
        (tmp_path / name).write_bytes(content)
    assert json.loads((tmp_path / NA_HEAD_CONFIG_FILE).read_text())["layers"] == [1]

    fresh = tiny_model(seed=1, tokenizer=tokenizer)
    assert load_na_head(fresh, tmp_path) is not None and not fresh.na_head.training
    after = score_questions(fresh, tokenizer, questions, DecodingSettings(extractive=True), progress=False)
    assert after.na_logits == before.na_logits and after.na_prob == before.na_prob and after.final == before.final
    assert len(set(before.na_prob.values())) > 1

    assert load_na_head(tiny_model(), tmp_path / "nothing-here") is None
    (tmp_path / NA_HEAD_CONFIG_FILE).unlink()
    with pytest.raises(LitQAError, match=f"has {NA_HEAD_WEIGHTS_FILE} but not {NA_HEAD_CONFIG_FILE}"):
        load_na_head(tiny_model(), tmp_path)
    (tmp_path / NA_HEAD_CONFIG_FILE).write_text(json.dumps({"layers": [1], "hidden_size": 0}))  # another shape
    with pytest.raises(LitQAError, match="does not fit na_head_config.json"):
        load_na_head(tiny_model(), tmp_path)


def test_a_model_weights_file_never_holds_the_head():
    model = lora_model_with_head()
    weights, head = split_na_head(model.state_dict())
    assert head and all(k.startswith("na_head.") for k in head) and not any(k.startswith("na_head.") for k in weights)
    with pytest.raises(LitQAError, match="has no no-answer head"):
        GPT(Config.from_name("tiny-gqa"))(torch.tensor([[4, 5]]), na_positions=torch.tensor([1]))


def test_a_run_with_the_head_stopped_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    samples = answerability_samples(16, seed=0)
    args = TrainArgs(global_batch_size=4, micro_batch_size=2, max_steps=8, learning_rate=1e-2, warmup_steps=2,
                     save_interval=3)  # fmt: skip
    uninterrupted = train(tmp_path / "full", lora_model_with_head(), samples, args)
    with crash_after_saving(monkeypatch, "step-000003"):
        train(tmp_path / "stopped", lora_model_with_head(), samples, args)
    restarted = lora_model_with_head()
    torch.nn.init.normal_(restarted.na_head.proj.weight)  # what resumes must come from the checkpoint
    resumed = train(tmp_path / "stopped", restarted, samples, args, resume=True)
    assert_same_weights(uninterrupted, resumed)
    untrained = lora_model_with_head()
    assert not torch.equal(untrained.na_head.proj.weight, resumed.na_head.proj.weight)


def answers_with(rows: dict[str, tuple[float, float, str]]) -> Answers:
    """Answers whose question id maps to (head logit, span logit, best span)."""
    return Answers(final={}, best_span={q: span for q, (_, _, span) in rows.items()},
                   na_prob={q: 0.5 for q in rows},
                   na_logits={q: {"head": head, "span": span} for q, (head, span, _) in rows.items()})  # fmt: skip


def test_rule_tuning_picks_always_abstain_when_nothing_helps_and_the_separating_rule_otherwise():
    questions = [make_question("a1", "Paris is big.", "Paris"), make_question("a2", "Rome is old.", "Rome"),
                 make_question("n1", "Oslo is cold.", None), make_question("n2", "Bern is calm.", None),
                 make_question("n3", "Bonn is small.", None)]  # fmt: skip
    # Useless: every best span is wrong, so answering anything loses; every rule must end at "always abstain".
    useless = answers_with({"a1": (0.3, -1.0, "big"), "a2": (-0.2, 2.0, "old"), "n1": (0.1, 0.5, "cold"),
                            "n2": (-0.4, -2.0, "calm"), "n3": (0.2, 1.0, "small")})  # fmt: skip
    always_abstain = evaluate_predictions(questions, {q.id: "" for q in questions})["f1"]
    source, threshold, f1 = best_na_rule(questions, useless)
    assert threshold == 0.0 and f1 == pytest.approx(always_abstain) == pytest.approx(60.0)
    assert all(t == 0.0 for t, _ in tune_na_rules(questions, useless).values())
    # Right spans; the head separates the kinds at a logit between 0 and 1, the span score is backwards.
    helpful = answers_with({"a1": (-1.0, 2.0, "Paris"), "a2": (0.0, 1.0, "Rome"), "n1": (1.0, -1.0, "x"),
                            "n2": (2.0, -2.0, "y"), "n3": (3.0, 0.0, "z")})  # fmt: skip
    source, threshold, f1 = best_na_rule(questions, helpful)
    assert source == "head" and f1 == 100.0
    assert torch.sigmoid(torch.tensor(0.0)) < threshold < torch.sigmoid(torch.tensor(1.0))  # between a2 and n1
    assert tune_na_rules(questions, helpful)["span"][1] < 100.0
    assert best_na_rule(questions, helpful, sources=("span",))[0] == "span"


def test_finetune_evaluate_and_merge_keep_the_head(prepared, tmp_path):  # noqa: F811
    """From the command line: the LoRA run saves the head in every folder; evaluation tunes the rule on the
    calibration questions and reports every rule; the merged folder evaluates to the same p_na as the adapter."""
    root, checkpoint, data_dir, train_file = prepared
    run = tmp_path / "run"
    result = finetune(tmp_path, checkpoint, data_dir)  # into tmp_path / "run"
    assert result.returncode == 0, result.stderr
    assert "no-answer head on blocks [0, 1]" in result.stdout and "no-answer head loss" in result.stdout
    for folder in (run / "step-000003", run / "final"):
        assert (folder / NA_HEAD_WEIGHTS_FILE).is_file() and (folder / NA_HEAD_CONFIG_FILE).is_file()

    common = ("--eval_file", str(train_file), "--max_new_tokens", "4", "--precision", "32-true")
    result = run_script("evaluate/lora.py", "--lora_dir", str(run / "final"), "--out_dir", str(tmp_path / "tuned"),
                        "--calibration_file", str(data_dir / "val-v2.0.json"), *common)  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert metrics["na_source"] in ("head", "span", "head+span") and set(metrics["na_rules"]) == {
        "head", "span", "head+span"}  # fmt: skip
    assert metrics["na_rules"][metrics["na_source"]]["threshold"] == metrics["na_threshold"]
    assert set(metrics["na_prob_auc_by_rule"]) == {"head", "span", "head+span"}
    assert metrics["calibration_f1"] >= metrics["calibration_always_abstain_f1"]

    merged = tmp_path / "merged"
    merging = run_script("scripts/merge_lora.py", "--lora_dir", str(run / "final"), "--out_dir", str(merged))
    assert merging.returncode == 0, merging.stderr
    for name in (NA_HEAD_WEIGHTS_FILE, NA_HEAD_CONFIG_FILE):
        assert (merged / name).read_bytes() == (run / "final" / name).read_bytes()
    fixed = ("--na_threshold", "0.5", *common)
    assert run_script("evaluate/lora.py", "--lora_dir", str(run / "final"), "--out_dir", str(tmp_path / "lora"),
                      *fixed).returncode == 0  # fmt: skip
    assert run_script("evaluate/base.py", "--checkpoint_dir", str(merged), "--out_dir", str(tmp_path / "base"),
                      *fixed).returncode == 0  # fmt: skip
    by_lora, by_base = (json.loads((tmp_path / name / "na_probs.json").read_text()) for name in ("lora", "base"))
    assert by_lora == by_base and json.loads((tmp_path / "base" / "metrics.json").read_text())["na_source"] == "head"


def test_the_optimizer_gives_the_head_its_own_learning_rate_and_every_trained_weight_a_group():
    from lit_qa.training.launch import make_optimizer

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = lora_model_with_head(config=NAHeadConfig(lr_scale=10.0))
    optimizer = make_optimizer(fabric, fabric.setup_module(model), TrainArgs(learning_rate=1e-3))
    groups = optimizer.param_groups
    assert [group["lr"] for group in groups] == [1e-3, pytest.approx(1e-2)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.na_head.parameters()}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for group in groups for p in group["params"]} == trained


def test_standardization_is_fitted_on_training_prompts_saved_with_the_head_and_the_same_every_time(tmp_path):
    samples = answerability_samples(40, seed=3)
    model = lora_model_with_head(config=NAHeadConfig(standardize_samples=16))
    assert standardize_na_head(model, samples, 16) == 16
    head = model.na_head
    assert head.mean.abs().sum() > 0 and not torch.equal(head.std, torch.ones_like(head.std))
    # The standardised features of the prompts it was fitted on have mean 0 and spread 1, feature by feature.
    batch = collate(samples[::2][:16], 0)
    _, kept = model._forward_blocks(batch["input_ids"], na_positions=last_prompt_positions(batch["labels"]))
    z = (head.features(kept) - head.mean[:, None]) / head.std[:, None]
    torch.testing.assert_close(z.mean(dim=1), torch.zeros_like(head.mean), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones_like(head.std), atol=1e-3, rtol=0)
    again = lora_model_with_head(config=NAHeadConfig(standardize_samples=16))
    standardize_na_head(again, samples, 16)
    assert torch.equal(again.na_head.mean, head.mean) and torch.equal(again.na_head.std, head.std)
    for name, content in na_head_files(model).items():
        (tmp_path / name).write_bytes(content)
    loaded = load_na_head(GPT(Config.from_name("tiny-gqa")), tmp_path)
    assert torch.equal(loaded.mean, head.mean) and torch.equal(loaded.std, head.std)
    assert standardize_na_head(model, samples, 0) == 0
