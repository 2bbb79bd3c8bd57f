# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Paragraph packs (`lit_qa.data.packing`): training questions/s packed vs unpacked vs transformers + peft.

    python -m benchmarks.packing                          # every part (about 15 minutes on 2 CPU cores)
    python -m benchmarks.packing --parts "[demo]" --steps 4

Parts, all in this one process, one after the other, on the same machine in the same minutes:

- ``attention``: one attention layer, forward and backward, over the packed rows of the demo's first micro-batch:
  SDPA with the segment mask as the model runs it (query heads folded per key/value head), SDPA with
  ``enable_gqa``, and split attention (the prefix causally, then each segment over [prefix keys, own keys]); and
  the same questions unpacked with plain causal attention. This is the measurement behind the model's choice.
- ``demo``: the demo config's LoRA and no-answer head (``configs/lora-smollm2-cpu.yaml``) on the same global
  batches of questions: lit-qa packed (the config's micro-batch), lit-qa unpacked (micro-batches of 4, grouped by
  length, as the demo trained before packing), and transformers + peft unpacked (the same LoRA targets, logits at
  every position, no head).
- ``gradients``: in fp32, the packed and unpacked gradients of twelve questions of one micro-batch.
- ``7b``: two blocks of a Llama-3.1-8B-shape model (random bf16 weights, full width, GQA, 128k vocabulary), LoRA
  r 8 on every linear layer, the same questions packed and unpacked: the ratio at the width of the models people
  fine-tune.

Reported: questions/s, tokens computed per second (padding excluded; packed rows compute each prefix once),
the padding share, seconds per optimizer step and the speed-up over unpacked lit-qa.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.utils import describe_machine, print_table, read_demo_config, write_results
from lit_qa.checkpoints.folder import load_model
from lit_qa.data.dataset import IGNORE_INDEX, collate, load_prepared, mark_unanswerable, read_prepare_config
from lit_qa.data.packing import collate_packed, forward_passes
from lit_qa.errors import LitQAError, run_cli
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.model import GPT, grouped_query_attention
from lit_qa.models.na_head import NAHeadConfig, attach_na_head, na_loss_sum
from lit_qa.models.segments import segment_mask
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.precision import resolve_precision, weights_dtype
from lit_qa.training.args import TrainArgs
from lit_qa.training.batches import epoch_global_batches, split_global_batch
from lit_qa.training.loss import loss_sums

PARTS = ("attention", "demo", "gradients", "7b")
UNPACKED_MICRO_BATCH = 4  # the demo's micro-batch before packing
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(
    demo_config: Path = Path("configs/lora-smollm2-cpu.yaml"),
    steps: int = 8,
    precision: str = "auto",
    parts: list[str] | None = None,
    out: Path = Path("out/benchmarks/packing.json"),
) -> None:
    """Measure packed against unpacked training (module docstring) and write the numbers as JSON.

    Args:
        demo_config: The demo's training config (data_dir, checkpoint_dir, lora, train are read from it;
            ``--config`` would be jsonargparse's own flag).
        steps: Timed optimizer steps per variant of the ``demo`` part (after one untimed step).
        precision: "auto" (bf16 where native, else fp32), "32-true" or "bf16-true".
        parts: Which of "attention", "demo", "gradients", "7b" to run; None runs all.
        out: Where the numbers go as JSON.
    """
    parts = list(PARTS) if parts is None else parts
    if unknown := sorted(set(parts) - set(PARTS)):
        raise LitQAError(f"unknown parts {unknown}; choose from: {', '.join(PARTS)}")
    demo = read_demo_config(demo_config)
    data_dir, checkpoint_dir, train_args, lora = demo.data_dir, demo.checkpoint_dir, demo.train, demo.lora
    precision = resolve_precision(precision, "cpu")
    dtype = weights_dtype(precision)
    data = load_prepared(data_dir, "train")
    if all(sample.get("paragraph", -1) < 0 for sample in data):
        raise LitQAError(f"{data_dir} records no paragraphs: prepare it again with scripts/prepare_squad.py")
    tokenizer = Tokenizer(checkpoint_dir)
    mark_unanswerable(data, tokenizer.encode(read_prepare_config(data_dir).get("no_answer", "unanswerable"),
                                             bos=False, eos=True))  # fmt: skip
    machine = describe_machine()
    print(f"{machine}; precision {precision}; global batch {train_args.global_batch_size} questions, packed "
          f"micro-batch {train_args.micro_batch_size}, unpacked micro-batch {UNPACKED_MICRO_BATCH}")  # fmt: skip
    batches = global_batches(data, train_args, steps + 1)
    max_length = max(len(sample["input_ids"]) for sample in data)
    results: dict[str, Any] = {"machine": machine, "precision": precision, "config": str(demo_config)}
    # The first micro-batch that holds a pack: its questions for the attention part and the gradient check.
    first = next(chunk for indices in batches
                 for chunk in [[data[i] for i in indices[: train_args.micro_batch_size]]]
                 if "segments" in collate_packed(chunk, 0, max_length))  # fmt: skip
    if "attention" in parts:
        results["attention"] = attention_part(first, Config.from_checkpoint(checkpoint_dir), dtype, max_length)
    if "demo" in parts:
        results["demo"] = demo_part(checkpoint_dir, data, batches, train_args, lora, dtype, max_length)
    if "gradients" in parts:
        # Twelve questions: unpacked fp32 activations of a whole micro-batch would take many gigabytes.
        results["gradients"] = gradient_check(checkpoint_dir, first[:12], lora, max_length)
    if "7b" in parts:
        results["7b"] = big_part(data, batches, train_args, dtype, max_length)
    write_results(out, results)


def global_batches(data: list[dict], train_args: TrainArgs, count: int) -> list[list[int]]:
    """The first ``count`` global batches of the packed epoch order (seed 42): every variant trains on these."""
    lengths = [len(sample["input_ids"]) for sample in data]
    paragraphs = [sample.get("paragraph", -1) for sample in data]
    order = epoch_global_batches(lengths, train_args.global_batch_size, 42, 0, paragraphs, train_args.pack_questions)
    return order[:count]


def micro_batches(data: list[dict], indices: list[int], packed: bool, micro_batch_size: int, max_length: int,
                  pad_multiple: int) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """One global batch as the loop would feed it on one CPU process: packed micro-batches in order, one pass per
    row, or unpacked ones by length. Each batch also says how many ``questions`` and real (not padding) ``tokens``
    it holds."""
    lengths = [len(sample["input_ids"]) for sample in data]
    size = micro_batch_size if packed else UNPACKED_MICRO_BATCH
    batches = []
    for chunk in split_global_batch(indices, lengths, size, group_by_length=not packed):
        # Packed rows one pass each, as the loop runs them on one CPU process.
        for batch in forward_passes([data[i] for i in chunk], 0, max_length, pad_multiple, packed, packed):
            batches.append({**batch, "questions": len(batch["unanswerable"]), "tokens": real_tokens(batch)})
    return batches


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions of a batch that are not padding: a packed batch's segments, or each unpacked sample's tokens (a
    sample ends with its answer's last token, the last labelled one)."""
    if "segments" in batch:
        return int((batch["segments"] >= 0).sum())
    labels = batch["labels"]
    ends = ((labels != IGNORE_INDEX).int() * torch.arange(1, labels.size(1) + 1)).max(dim=1).values
    return int(ends.sum())


def time_steps(step: Callable[[list[dict[str, Any]]], None], batches: list[list[dict]]) -> dict[str, float]:
    """Run one optimizer step per entry of ``batches`` (the first untimed) and report the throughput."""
    seconds, real, computed, questions = [], 0, 0, 0
    for i, micro in enumerate(batches):
        start = time.perf_counter()
        step(micro)
        if i:
            seconds.append(time.perf_counter() - start)
            real += sum(batch["tokens"] for batch in micro)
            computed += sum(batch["input_ids"].numel() for batch in micro)
            questions += sum(batch["questions"] for batch in micro)
    total = sum(seconds)
    return {"questions/s": questions / total, "tokens computed/s": real / total,
            "tokens per question": real / questions, "padding %": 100.0 * (computed - real) / computed,
            "s/step": statistics.median(seconds)}  # fmt: skip


def lit_lora_model(checkpoint_dir: Path, dtype: torch.dtype, lora: LoRAConfig) -> GPT:
    torch.manual_seed(42)
    model, _ = load_model(checkpoint_dir, dtype=dtype)
    apply_lora(model, lora)
    mark_only_lora_as_trainable(model)
    attach_na_head(model, NAHeadConfig(standardize_samples=0))
    return model.train()


def lit_step(model: GPT, global_batch_size: int) -> Callable[[list[dict]], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(micro: list[dict[str, torch.Tensor]]) -> None:
        loss_tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in micro)
        for batch in micro:
            token_sum, na_logits = loss_sums(model, batch)
            loss = token_sum / loss_tokens
            if na_logits is not None:
                loss = loss + na_loss_sum(na_logits, batch["unanswerable"]) / global_batch_size
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_lora_model(checkpoint_dir: Path, dtype: torch.dtype, lora: LoRAConfig) -> torch.nn.Module:
    import peft
    import transformers

    from lit_qa.checkpoints.convert_hf import convert_lit_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        convert_lit_to_hf(checkpoint_dir, Path(tmp) / "hf", overwrite=True)
        model = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype)
    targets = [name for name, on in zip(LINEAR_NAMES, (lora.query, lora.key, lora.value, lora.projection, lora.mlp,
                                                        lora.mlp, lora.mlp)) if on]  # fmt: skip
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(model, config).train()


def hf_step(model: torch.nn.Module) -> Callable[[list[dict]], None]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(micro: list[dict[str, torch.Tensor]]) -> None:
        loss_tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in micro)
        for batch in micro:
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / loss_tokens
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def demo_part(checkpoint_dir: Path, data: list[dict], batches: list[list[int]], train_args: TrainArgs,
              lora: LoRAConfig, dtype: torch.dtype, max_length: int) -> list[dict[str, Any]]:  # fmt: skip
    """lit-qa packed, lit-qa unpacked and transformers + peft unpacked on the same global batches."""
    feeds = {packed: [micro_batches(data, indices, packed, train_args.micro_batch_size, max_length,
                                    train_args.pad_multiple) for indices in batches]
             for packed in (True, False)}  # fmt: skip
    rows = []
    for name, make_step, packed in (
        ("lit-qa packed", lambda: lit_step(lit_lora_model(checkpoint_dir, dtype, lora), train_args.global_batch_size), True),
        ("lit-qa unpacked", lambda: lit_step(lit_lora_model(checkpoint_dir, dtype, lora), train_args.global_batch_size), False),
        ("transformers + peft", lambda: hf_step(hf_lora_model(checkpoint_dir, dtype, lora)), False),
    ):  # fmt: skip
        result = time_steps(make_step(), feeds[packed])
        rows.append({"implementation": name, **{k: round(v, 2) for k, v in result.items()}})
        print(rows[-1], flush=True)
    return speedups(rows, "lit-qa unpacked")


def speedups(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    base = next(row["questions/s"] for row in rows if row["implementation"] == reference)
    for row in rows:
        row[f"vs {reference}"] = f"{row['questions/s'] / base:.2f}x"
    print_table(rows)
    return rows


def gradient_check(checkpoint_dir: Path, samples: list[dict], lora: LoRAConfig, max_length: int) -> dict[str, float]:
    """fp32 gradients of the LoRA weights and the head, one micro-batch packed and unpacked: the largest
    difference relative to the largest gradient, and of the summed loss."""
    model = lit_lora_model(checkpoint_dir, torch.float32, replace(lora, dropout=0.0))
    gradients, losses = [], []
    for batch in (collate_packed(samples, 0, max_length, 64), collate(samples, 0, max_length, 64)):
        model.zero_grad()
        token_sum, na_logits = loss_sums(model, batch)
        loss = token_sum + na_loss_sum(na_logits, batch["unanswerable"])
        loss.backward()
        losses.append(float(loss))
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    packed, plain = gradients
    largest = max(float(g.abs().max()) for g in plain.values())
    difference = max(float((packed[n] - plain[n]).abs().max()) for n in plain)
    result = {"questions": len(samples), "relative gradient difference": difference / largest,
              "loss packed": losses[0], "loss unpacked": losses[1]}  # fmt: skip
    print(f"fp32 gradients, {len(samples)} questions packed vs unpacked: largest difference "
          f"{result['relative gradient difference']:.2e} of the largest gradient; loss {losses[0]:.6f} vs "
          f"{losses[1]:.6f}")  # fmt: skip
    return result


def big_part(data: list[dict], batches: list[list[int]], train_args: TrainArgs, dtype: torch.dtype,
             max_length: int) -> list[dict[str, Any]]:  # fmt: skip
    """Two blocks of a Llama-3.1-8B-shape model: the same questions packed and unpacked."""
    config = replace(Config.from_name("Llama-3.1-8B"), n_layer=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu").to(dtype)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    model.reset_rope_cache()
    model.max_seq_length = max_length
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, query=True, key=True, value=True, projection=True,
                                 mlp=True))  # fmt: skip
    mark_only_lora_as_trainable(model)
    model.train()
    step = lit_step(model, train_args.global_batch_size)
    rows = []
    for name, packed in (("lit-qa packed", True), ("lit-qa unpacked", False)):
        feed = [micro_batches(data, indices, packed, train_args.micro_batch_size, max_length, train_args.pad_multiple)
                for indices in batches[:3]]  # fmt: skip
        result = time_steps(step, feed)
        rows.append({"implementation": f"{name} (Llama-3.1-8B shape, 2 of 32 blocks)",
                     **{k: round(v, 2) for k, v in result.items()}})  # fmt: skip
        print(rows[-1], flush=True)
    rows[1]["implementation"], reference = "lit-qa unpacked", rows[1]["implementation"]
    result = speedups(rows, "lit-qa unpacked")
    rows[1]["implementation"] = reference
    return result


def attention_part(samples: list[dict], config: Config, dtype: torch.dtype, max_length: int) -> list[dict[str, Any]]:
    """One attention layer, forward and backward, for the packed rows of one micro-batch and for the same
    questions unpacked; the shapes of the real model (heads, key/value heads, head size)."""
    packed = collate_packed(samples, 0, max_length, 64)
    lengths = [len(sample["input_ids"]) for sample in samples]
    plain = [collate([samples[i] for i in chunk], 0, max_length, 64)["input_ids"].shape
             for chunk in split_global_batch(list(range(len(samples))), lengths, UNPACKED_MICRO_BATCH, True)]  # fmt: skip
    segments = packed["segments"]
    mask = segment_mask(segments)
    nh, ng, hs = config.n_head, config.n_query_groups, config.head_size
    generator = torch.Generator().manual_seed(0)

    def tensors(B: int, T: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(B, heads, T, hs, generator=generator).to(dtype).requires_grad_()
                     for heads in (nh, ng, ng))  # fmt: skip

    variants = {
        "packed: SDPA + segment mask, heads folded (the model's choice)": (
            lambda q, k, v: grouped_query_attention(q, k, v, mask), tensors(*segments.shape)),
        "packed: SDPA + segment mask, enable_gqa": (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            tensors(*segments.shape)),
        "packed: split attention (prefix, then segments over [prefix, own])": (
            lambda q, k, v: split_attention(q, k, v, segments), tensors(*segments.shape)),
        "packed: per row, prefix causally, then the segments' queries over the row": (
            lambda q, k, v: row_split_attention(q, k, v, segments), tensors(*segments.shape)),
    }  # fmt: skip
    variants = {name: (attend, [qkv]) for name, (attend, qkv) in variants.items()}
    # Unpacked: the length-grouped micro-batches of 4 the demo trained on before packing, their times summed.
    variants["unpacked: causal SDPA, enable_gqa, micro-batches of 4"] = (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        [tensors(*shape) for shape in plain])  # fmt: skip
    rows = []
    for name, (attend, inputs) in variants.items():
        def run() -> None:
            for q, k, v in inputs:
                attend(q, k, v).float().sum().backward()

        run()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        shapes = " + ".join(f"{q.size(0)} x {q.size(2)}" for q, _, _ in inputs)
        rows.append({"attention (one layer, forward + backward)": name, "rows x tokens": shapes,
                     "ms": round(1000 * statistics.median(times), 2)})  # fmt: skip
    q, k, v = tensors(*segments.shape)  # the split variant must compute what the mask does
    real = (segments >= 0)[:, None, :, None]
    reference = grouped_query_attention(q, k, v, mask)
    for split in (split_attention, row_split_attention):
        difference = (reference - split(q, k, v, segments)).float().abs()
        print(f"{len(samples)} questions in {segments.size(0)} packed rows; {split.__name__} and the masked attention "
              f"differ by at most {float(difference.masked_select(real.expand_as(difference)).max()):.2e}")  # fmt: skip
    print_table(rows)
    return rows


def row_split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The segment-mask attention per row in two calls: the prefix's queries causally over the prefix (the kernel
    skips the masked half), then the segments' queries over the row's keys with the segment mask (no prefix rows)."""
    outputs = []
    mask = segment_mask(segments)
    for row in range(q.size(0)):
        prefix = int((segments[row] == 0).sum())
        parts = []
        if prefix:
            parts.append(F.scaled_dot_product_attention(q[row : row + 1, :, :prefix], k[row : row + 1, :, :prefix],
                                                        v[row : row + 1, :, :prefix], is_causal=True,
                                                        enable_gqa=True))  # fmt: skip
        parts.append(grouped_query_attention(q[row : row + 1, :, prefix:], k[row : row + 1], v[row : row + 1],
                                             mask[row : row + 1, :, prefix:]))  # fmt: skip
        outputs.append(torch.cat(parts, dim=2))
    return torch.cat(outputs)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """The segment-mask attention computed per row as two parts: the prefix's queries causally over the prefix,
    then every segment's queries over [prefix keys, own keys] (segments gathered into a padded batch)."""
    out = torch.zeros_like(q)
    rows = []
    for row in range(q.size(0)):
        ids = segments[row]
        prefix = int((ids == 0).sum())
        if prefix:
            out[row : row + 1, :, :prefix] = F.scaled_dot_product_attention(
                q[row : row + 1, :, :prefix], k[row : row + 1, :, :prefix], v[row : row + 1, :, :prefix],
                is_causal=True, enable_gqa=True)  # fmt: skip
        for segment in ids[ids > 0].unique().tolist():
            where = (ids == segment).nonzero()[:, 0]
            rows.append((row, prefix, where))
    longest = max(len(where) for _, _, where in rows)
    keys = max(prefix for _, prefix, _ in rows) + longest
    B, nh, ng, hs = len(rows), q.size(1), k.size(1), q.size(-1)
    qs = q.new_zeros(B, nh, longest, hs)
    ks, vs = k.new_zeros(B, ng, keys, hs), v.new_zeros(B, ng, keys, hs)
    mask = torch.zeros(B, 1, longest, keys, dtype=torch.bool)
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()
    for i, (row, prefix, where) in enumerate(rows):
        n = len(where)
        qs[i, :, :n] = q[row, :, where]
        ks[i, :, :prefix], vs[i, :, :prefix] = k[row, :, :prefix], v[row, :, :prefix]
        ks[i, :, prefix : prefix + n], vs[i, :, prefix : prefix + n] = k[row, :, where], v[row, :, where]
        mask[i, 0, :, :prefix] = True
        mask[i, 0, :, prefix : prefix + n] = causal[:, :n]
    ys = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
    for i, (row, _, where) in enumerate(rows):
        out[row, :, where] = ys[i, :, : len(where)]
    return out


if __name__ == "__main__":
    run_cli(main)
