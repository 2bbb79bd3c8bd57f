# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Where the demo's training minutes go, and how many samples per second each training setting gets through.

    python -m benchmarks.demo_budget                 # the demo's settings (configs/lora-smollm2-cpu.yaml) and variants
    python -m benchmarks.demo_budget --steps 4       # quicker, noisier

Every variant trains the same optimizer steps (the first ``steps`` global batches of the demo's epoch order) from
the same LoRA initialisation, in this one process, one after the other, so they are compared on the same machine
in the same minutes. Reported per variant: real samples/s and tokens/s, the share of computed tokens that are
padding, and seconds per optimizer step. Then the other costs of a demo run: one validation (loss over
``--eval.max_batches`` micro-batches), its sample generations, and the start-up check.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.packing import real_tokens
from benchmarks.utils import describe_machine, print_table, read_demo_config, write_results
from lit_qa.checkpoints.folder import load_model
from lit_qa.data.dataset import load_prepared, mark_unanswerable, read_prepare_config
from lit_qa.data.packing import forward_passes
from lit_qa.errors import LitQAError, run_cli
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.na_head import NAHeadConfig, attach_na_head, na_loss_sum
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.precision import resolve_precision, weights_dtype
from lit_qa.training.args import TrainArgs
from lit_qa.training.batches import count_loss_tokens, rank_batches_of_epoch
from lit_qa.training.loop import compile_blocks
from lit_qa.training.loss import loss_sums
from lit_qa.training.validation import print_sample_generations, validation_metrics

VARIANTS = {
    "demo settings": {},
    "unpacked (pad to 64, length-grouped)": {"pack": False},
    "the other precision": {"precision": "other"},
    "pad to 16": {"pad_multiple": 16},
    "pad to 8": {"pad_multiple": 8},
    "no length grouping": {"group_by_length": False},
    "compiled blocks": {"compile": True},
    "without the no-answer head": {"na_head": False},
}


class Quiet:
    """A stand-in Fabric for `validate` and `print_sample_generations` on one process."""

    device, world_size, global_rank = torch.device("cpu"), 1, 0

    def all_reduce(self, tensor, reduce_op="sum"):
        return tensor

    def print(self, *args, **kwargs):
        pass


def make_model(checkpoint_dir: Path, dtype: torch.dtype, lora: LoRAConfig, na_head: bool, compile: bool):
    torch.manual_seed(42)
    model, _ = load_model(checkpoint_dir, dtype=dtype)
    apply_lora(model, lora)
    mark_only_lora_as_trainable(model)
    if na_head:
        attach_na_head(model, NAHeadConfig())
    if compile:
        compile_blocks(model)
    return model.train()


def train_steps(model, data, train_args: TrainArgs, steps: int, pad_id: int) -> dict[str, float]:
    """Run ``steps`` optimizer steps (after one untimed warm-up step); time each, count real and padded tokens."""
    lengths = [len(s["input_ids"]) for s in data]
    loss_counts = [count_loss_tokens(s) for s in data]
    paragraphs = [s.get("paragraph", -1) for s in data] if train_args.pack else None
    plan = rank_batches_of_epoch(lengths, loss_counts, train_args, 0, 42, 1, 0, paragraphs)[: steps + 1]
    max_length = max(lengths)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_args.learning_rate)
    step_seconds, real, computed = [], 0, 0
    for step, (micro_batches, loss_tokens) in enumerate(plan):
        start = time.perf_counter()
        for indices in micro_batches:
            # As the loop runs them on one CPU process: packed rows one pass each.
            for batch in forward_passes([data[i] for i in indices], pad_id, max_length, train_args.pad_multiple,
                                        train_args.pack, train_args.pack):  # fmt: skip
                token_sum, na_logits = loss_sums(model, batch)
                loss = token_sum / loss_tokens
                if na_logits is not None:
                    loss = loss + na_loss_sum(na_logits, batch["unanswerable"]) / train_args.global_batch_size
                loss.backward()
                if step:
                    computed += batch["input_ids"].numel()
                    real += real_tokens(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step pays for allocations (and compilation): not timed
            step_seconds.append(time.perf_counter() - start)
    seconds = sum(step_seconds)
    return {"questions/s": steps * train_args.global_batch_size / seconds, "real tokens/s": real / seconds,
            "padding %": 100.0 * (computed - real) / computed, "s/step": statistics.median(step_seconds)}  # fmt: skip


def main(
    demo_config: Path = Path("configs/lora-smollm2-cpu.yaml"),
    steps: int = 8,
    precision: str = "auto",
    out: Path = Path("out/benchmarks/demo_budget.json"),
    variants: list[str] | None = None,
) -> None:
    """Measure the demo's training settings against variants, and the demo's other costs.

    Args:
        demo_config: The demo's training config (data_dir, checkpoint_dir, lora, train, eval are read from it;
            ``--config`` would be jsonargparse's own flag).
        steps: Timed optimizer steps per variant (of the config's global batch size).
        precision: "auto" (bf16 where native, else fp32), "32-true" or "bf16-true".
        out: Where the numbers go as JSON.
        variants: Names of `VARIANTS` to run (the demo's settings always run first); None runs them all.
    """
    unknown = sorted(set(variants or ()) - set(VARIANTS))
    if unknown:
        raise LitQAError(f"unknown variants {unknown}; choose from: {', '.join(VARIANTS)}")
    chosen = [name for i, name in enumerate(VARIANTS) if i == 0 or variants is None or name in variants]
    demo = read_demo_config(demo_config)
    data_dir, checkpoint_dir, train_args, eval_args, lora = (demo.data_dir, demo.checkpoint_dir, demo.train, demo.eval,
                                                             demo.lora)  # fmt: skip
    precision = resolve_precision(precision, "cpu")
    dtype = weights_dtype(precision)
    data, val_data = load_prepared(data_dir, "train"), load_prepared(data_dir, "val")
    tokenizer = Tokenizer(checkpoint_dir)
    no_answer = tokenizer.encode(read_prepare_config(data_dir).get("no_answer", "unanswerable"), bos=False, eos=True)
    for samples in (data, val_data):
        mark_unanswerable(samples, no_answer)
    pad_id = tokenizer.eos_id or 0
    print(f"{describe_machine()}; precision {precision}; {steps} steps x {train_args.global_batch_size} samples each")

    rows = []
    for name in chosen:
        change = VARIANTS[name]
        na_head = change.get("na_head", True)
        variant_dtype = dtype
        if change.get("precision") == "other":  # fp32 where "auto" chose bf16, and the other way round
            variant_dtype = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
            name = f"{'32-true' if variant_dtype == torch.float32 else 'bf16-true'} instead of {precision}"
        args = replace(train_args, **{k: v for k, v in change.items() if k not in ("na_head", "precision")})
        model = make_model(checkpoint_dir, variant_dtype, lora, na_head, args.compile)
        result = train_steps(model, data, args, steps, pad_id)
        rows.append({"variant": name, **{k: round(v, 2) for k, v in result.items()}})
        print(rows[-1], flush=True)
    baseline = rows[0]["questions/s"]
    for row in rows:
        row["vs demo"] = f"{row['questions/s'] / baseline:.2f}x"
    print_table(rows)

    model = make_model(checkpoint_dir, dtype, lora, True, False)
    fabric = Quiet()
    start = time.perf_counter()
    validation_metrics(fabric, model, val_data, train_args.micro_batch_size, eval_args.max_batches,
                       train_args.pad_multiple)  # fmt: skip
    validation = time.perf_counter() - start
    start = time.perf_counter()
    print_sample_generations(fabric, model, val_data, tokenizer, eval_args)
    generations = time.perf_counter() - start
    step_seconds = rows[0]["s/step"]
    steps_in_run = train_args.max_steps or steps  # a config without max_steps: as many as were timed
    validations = max(1, steps_in_run // eval_args.interval)
    costs = {"validation (s)": round(validation, 1), "sample generations (s)": round(generations, 1),
             "demo step (s)": step_seconds, "demo steps": steps_in_run, "validations per demo run": validations}
    validating = validations * (validation + generations)
    costs["share of the demo's training minutes spent validating (%)"] = round(
        100 * validating / (steps_in_run * step_seconds + validating), 1)  # fmt: skip
    print(costs)
    write_results(out, {"machine": describe_machine(), "precision": precision, "steps": steps, "rows": rows,
                        "costs": costs})  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
