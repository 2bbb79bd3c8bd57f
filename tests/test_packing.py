# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Paragraph packs (lit_qa.data.packing, lit_qa.models.segments): a packed batch computes what its questions
would compute alone — the same per-question losses, no-answer logits and gradients — in fewer tokens."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import lit_qa.data.packing as packing
import lit_qa.training.loop as loop
from lit_qa.data.dataset import IGNORE_INDEX, collate
from lit_qa.data.packing import collate_packed, packed_length, packing_stats, plan_packs, shared_prefix_length
from lit_qa.models.adapter import AdapterConfig, apply_adapter, mark_only_adapter_as_trainable
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.model import GPT
from lit_qa.models.na_head import NAHeadConfig, answer_start_mask, attach_na_head, na_loss_sum
from lit_qa.models.segments import segment_mask, segment_positions
from lit_qa.training.args import EvalArgs, TrainArgs
from lit_qa.training.batches import epoch_global_batches, paragraph_runs, rank_batches_of_epoch
from lit_qa.training.loop import fit
from lit_qa.training.loss import loss_sums

TOKENIZER = type("T", (), {"eos_id": 1, "eos_ids": {1}})()


def paragraph_samples(paragraphs: list[int], seed: int = 0, prefix_range=(12, 30)) -> list[dict]:
    """Samples in file order: for each entry of ``paragraphs``, that many questions sharing a random prompt prefix
    (its paragraph), each with its own question tokens and a 1-3 token answer; 0 stands for a windowed question
    (its own prompt, paragraph -1). Every other question is unanswerable."""
    generator = torch.Generator().manual_seed(seed)

    def randint(low, high, n=None):
        return torch.randint(low, high, (n,) if n else (1,), generator=generator) if n else int(
            torch.randint(low, high, (1,), generator=generator))

    samples = []
    for p, count in enumerate(paragraphs):
        prefix = randint(2, 100, randint(*prefix_range))
        for q in range(max(count, 1)):
            own, answer = randint(2, 100, randint(3, 9)), randint(2, 100, randint(1, 4))
            ids = torch.cat([prefix, own, answer])
            labels = torch.cat([torch.full((len(prefix) + len(own),), IGNORE_INDEX), answer])
            samples.append({"id": f"p{p}q{q}", "input_ids": ids, "labels": labels, "paragraph": p if count else -1,
                            "unanswerable": bool(len(samples) % 2)})  # fmt: skip
    return samples


def tiny_model(method: str = "lora", seed: int = 0) -> GPT:
    """A tiny GQA model (4 query heads on 2 key/value heads) with a no-answer head and a trainable method."""
    torch.manual_seed(seed)
    model = GPT(Config.from_name("tiny-gqa"))
    if method == "lora":
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, key=True, value=True, projection=True,
                                       mlp=True))
        mark_only_lora_as_trainable(model)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.02)
    elif method.startswith("adapter"):
        apply_adapter(model, AdapterConfig(version=2 if method == "adapter_v2" else 1, start_layer=0))
        mark_only_adapter_as_trainable(model)
        for name, parameter in model.named_parameters():
            if "adapter_gate" in name:
                torch.nn.init.normal_(parameter, std=0.5)  # open the gates, so the prompt changes the output
    attach_na_head(model, NAHeadConfig(layers=[0, 1], standardize_samples=0))
    return model


def per_question(model: GPT, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each question's summed answer-token loss and its no-answer logit, in question order (rows, then segments)."""
    logits, na_logits = model(batch["input_ids"], segments=batch.get("segments"),
                              na_positions=answer_start_mask(batch["labels"]))  # fmt: skip
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    segments = batch.get("segments", torch.ones_like(batch["labels"]))[:, 1:]  # the question each target belongs to
    sums = [losses[row][(segments[row] == k) & (targets[row] != IGNORE_INDEX)].sum()
            for row in range(len(targets)) for k in segments[row].unique().tolist() if k > 0]  # fmt: skip
    return torch.stack(sums), na_logits


def gradients(model: GPT, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    token_sum, na_logits = loss_sums(model, batch)
    (token_sum + na_loss_sum(na_logits, batch["unanswerable"])).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "adapter", "full"])
def test_a_packed_batch_gives_each_question_its_unpacked_loss_no_answer_logit_and_gradients(method, monkeypatch):
    # Two paragraphs of 3 and 4 questions, a windowed question, and a paragraph cut in two packs by the budget
    # (here the sample limit itself, so that small numbers show it).
    monkeypatch.setattr(packing, "PACK_LENGTH_FACTOR", 1)
    samples = paragraph_samples([3, 0, 4, 5], seed=1)
    max_length = max(packed_length(samples[0:3]), packed_length(samples[4:8]), packed_length(samples[8:11]))
    model = tiny_model(method)
    plain = collate(samples, 0, max_length)
    packed = collate_packed(samples, 0, max_length, pad_multiple=8)
    assert [len(row) for row in plan_packs(samples, max_length)] == [3, 1, 4, 3, 2]
    assert packed["input_ids"].numel() < plain["input_ids"].numel() * 0.7
    for mode in (model.eval, model.train):  # no dropout in these models: the same either way
        mode()
        plain_losses, plain_na = per_question(model, plain)
        packed_losses, packed_na = per_question(model, packed)
        torch.testing.assert_close(packed_losses, plain_losses, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed_na, plain_na, rtol=1e-5, atol=1e-5)
    plain_grads, packed_grads = gradients(model, plain), gradients(model, packed)
    assert plain_grads.keys() == packed_grads.keys() and len(plain_grads) > 2
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_changing_one_question_leaves_every_other_question_of_the_pack_unchanged():
    samples = paragraph_samples([5])
    model = tiny_model().eval()
    losses, na = per_question(model, collate_packed(samples, 0, 128))
    changed = [dict(sample) for sample in samples]
    prompt = int((changed[2]["labels"] == IGNORE_INDEX).sum())
    changed[2]["input_ids"] = changed[2]["input_ids"].clone()
    changed[2]["input_ids"][prompt - 3 : prompt] = torch.tensor([7, 8, 9])  # question 2's own tokens
    batch = collate_packed(changed, 0, 128)
    assert batch["input_ids"].shape[0] == 1  # still one pack
    new_losses, new_na = per_question(model, batch)
    others = [0, 1, 3, 4]
    torch.testing.assert_close(new_losses[others], losses[others], rtol=0, atol=1e-6)
    torch.testing.assert_close(new_na[others], na[others], rtol=0, atol=1e-6)
    assert (new_losses[2] - losses[2]).abs() > 1e-4 and (new_na[2] - na[2]).abs() > 1e-6


def test_segment_positions_and_mask():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1], [1, 1, 1, 1, -1, -1, -1, -1, -1]])
    positions = segment_positions(segments)
    assert positions[0, :8].tolist() == [0, 1, 2, 3, 4, 3, 4, 5] and positions[1, :4].tolist() == [0, 1, 2, 3]
    mask = segment_mask(segments)[:, 0]
    # Segment 2's first token sees the prefix and itself, not segment 1.
    assert mask[0, 5].tolist() == [True, True, True, False, False, True, False, False, False]
    assert mask[0, 4].tolist() == [True, True, True, True, True, False, False, False, False]
    # A row without a prefix is plain causal; its padding sees only padding, so no softmax row is empty.
    assert mask[1, :4, :4].equal(torch.ones(4, 4, dtype=torch.bool).tril()) and not mask[1, 4:, :4].any()
    assert mask[1, 4:, 4:].equal(torch.ones(5, 5, dtype=torch.bool).tril())


def test_shared_prefix_leaves_each_question_its_last_prompt_token():
    samples = paragraph_samples([2])
    duplicate = dict(samples[0], labels=samples[0]["labels"].clone())  # the same prompt twice (--answers all)
    prompt = int((duplicate["labels"] == IGNORE_INDEX).sum())
    assert shared_prefix_length([samples[0], duplicate]) == prompt - 1
    assert shared_prefix_length(samples) < prompt - 1


def test_packing_stats_count_the_prefix_once():
    samples = paragraph_samples([3, 0, 1])
    stats = packing_stats(samples)
    prefix = shared_prefix_length(samples[:3])
    tokens = sum(len(s["input_ids"]) for s in samples)
    assert stats["packs"] == 1 and stats["packed_samples"] == 3 and stats["single_samples"] == 2
    assert stats["tokens"] == tokens and stats["packed_tokens"] == tokens - 2 * prefix


def test_packed_order_is_shuffled_runs_of_one_paragraph_each():
    samples = paragraph_samples([5, 0, 7, 3, 0, 6], prefix_range=(5, 8))
    paragraphs = [s["paragraph"] for s in samples]
    lengths = [len(s["input_ids"]) for s in samples]
    for pack_questions, most in ((0, 7), (2, 2)):
        runs = paragraph_runs(paragraphs, pack_questions, torch.Generator().manual_seed(0))
        assert sorted(i for run in runs for i in run) == list(range(len(samples)))
        assert all(len({paragraphs[i] for i in run}) == 1 and len(run) <= most for run in runs)
        assert all(len(run) == 1 for run in runs if paragraphs[run[0]] < 0)
        assert len(runs) == (6 if pack_questions == 0 else 3 + 1 + 4 + 2 + 1 + 3)
        batches = epoch_global_batches(lengths, 4, seed=3, epoch=1, paragraphs=paragraphs,
                                       pack_questions=pack_questions)  # fmt: skip
        assert batches == epoch_global_batches(lengths, 4, 3, 1, paragraphs, pack_questions)  # a pure function
        order = [i for batch in batches for i in batch]
        assert len(order) == len(set(order)) == len(samples) // 4 * 4
        # Every paragraph's samples sit in at most as many stretches as it has runs.
        stretches = sum(1 for a, b in zip([None] + order, order) if a is None or paragraphs[a] != paragraphs[b] or
                        paragraphs[b] < 0)  # fmt: skip
        assert stretches <= len(runs)
    assert epoch_global_batches(lengths, 4, 3, 2, paragraphs) != epoch_global_batches(lengths, 4, 3, 1, paragraphs)


def test_packed_micro_batches_keep_the_order_and_every_rank_its_share():
    samples = paragraph_samples([6, 4, 6])
    lengths = [len(s["input_ids"]) for s in samples]
    counts = [int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples]
    paragraphs = [s["paragraph"] for s in samples]
    args = TrainArgs(global_batch_size=8, micro_batch_size=2)
    one = rank_batches_of_epoch(lengths, counts, args, 0, 0, 1, 0, paragraphs)
    two = [rank_batches_of_epoch(lengths, counts, args, 0, 0, 2, rank, paragraphs) for rank in (0, 1)]
    for step, (micro_batches, tokens) in enumerate(one):
        assert [i for mb in micro_batches for i in mb] == epoch_global_batches(lengths, 8, 0, 0, paragraphs)[step]
        assert two[0][step][0] == micro_batches[0::2] and two[1][step][0] == micro_batches[1::2]
        assert two[0][step][1] == two[1][step][1] == tokens


def run_fit(tmp_path, samples, train_args, monkeypatch=None, layout=None):
    """Fit a tiny LoRA model with SGD; ``layout`` "one pass" puts a micro-batch's packed rows through the model
    together, "unpacked" gives every sample a row of its own (both in the packed run's data order)."""
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = tiny_model()
    model = fabric.setup_module(model.eval())
    optimizer = fabric.setup_optimizers(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0))
    if layout is not None:
        def passes(samples, pad_id, max_length, pad_multiple, pack, row_passes):
            assert pack and row_passes  # what a packed run on one CPU process asks for
            return packing.forward_passes(samples, pad_id, max_length, pad_multiple, pack=layout == "one pass")

        monkeypatch.setattr(loop, "forward_passes", passes)
    fit(fabric, model, optimizer, samples, samples[:6], train_args, EvalArgs(interval=1000, max_batches=2, num_samples=0),
        tmp_path, lambda folder: None, TOKENIZER, seed=0)  # fmt: skip
    return model.module


def test_training_packed_gives_the_weights_of_training_unpacked_on_the_same_order(tmp_path, monkeypatch):
    """Packed rows one pass each (the default on one CPU process), all rows in one padded pass, and every sample
    unpacked: the same data order gives the same weights."""
    samples = paragraph_samples([4, 0, 3, 5, 2])
    args = TrainArgs(global_batch_size=6, micro_batch_size=3, max_steps=3, learning_rate=1.0, warmup_steps=0,
                     save_interval=1000, pad_multiple=8)  # fmt: skip
    row_passes = run_fit(tmp_path / "rows", samples, args)
    initial = tiny_model().state_dict()
    for layout in ("one pass", "unpacked"):
        other = run_fit(tmp_path / layout, samples, args, monkeypatch, layout)
        changed = 0
        for (name, a), (_, b) in zip(row_passes.state_dict().items(), other.state_dict().items(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{layout}: {name}")
            changed += not torch.equal(a, initial[name])
        assert changed >= 4


def test_flex_attention_block_mask_gives_the_segment_mask_attention():
    """The CUDA path's FlexAttention block mask states the same rule as the SDPA mask (forward on CPU, where torch
    compiles it; its backward runs on CUDA only, in benchmarks/gpu_check.py's packed check)."""
    from lit_qa.models.model import grouped_query_attention
    from lit_qa.models.segments import compiled_flex_attention, segment_block_mask

    segments = torch.tensor([[0] * 20 + [1] * 6 + [2] * 5 + [-1], [1] * 30 + [-1] * 2])
    q, k, v = torch.randn(2, 4, 32, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    flex = compiled_flex_attention()(q, k, v, block_mask=segment_block_mask(segments), enable_gqa=True)
    sdpa = grouped_query_attention(q, k, v, segment_mask(segments))
    real = (segments >= 0)[:, None, :, None].expand_as(sdpa)
    torch.testing.assert_close(flex[real], sdpa[real], rtol=1e-5, atol=1e-5)
