# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Training speed and memory: lit-qa vs Hugging Face `transformers` + `peft`, same weights, batch and data.

    python -m benchmarks.train                       # SmolLM2-135M, fp32, 4 x 256 tokens, LoRA and full
    python -m benchmarks.train --precision bf16-true --methods "[lora]"

Each (implementation, method) runs in a fresh subprocess, so its peak memory (resident set size on CPU,
``torch.cuda.max_memory_allocated`` on GPU) is its own. Every run takes the same micro-batches: real
SQuAD prompts from the demo split with their answers, padded to ``seq_length`` tokens, loss on the answer
tokens only, an AdamW step after each micro-batch. LoRA is r 8 / alpha 16 / dropout 0.05 on the query and
value projections on both sides (the known-good 7B recipe). The Hugging Face model is our checkpoint
exported with `lit_qa.checkpoints.convert_hf.convert_lit_to_hf`.

Model FLOPs utilisation (MFU) counts the useful work of the transformer blocks only: the matmuls of the
forward pass (2 FLOPs per weight per token) plus causal attention, doubled for LoRA and adapters (the
backward pass needs input gradients, not weight gradients) and tripled for full fine-tuning; the output
head is not counted, since only the answer positions need it. It is measured against the peak of a large ``torch.mm`` in the
same run (and on GPU also against the datasheet).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.utils import describe_machine, print_table, write_results
from lit_qa.checkpoints.folder import load_model
from lit_qa.data.dataset import collate
from lit_qa.data.prepare import QuestionEncoder
from lit_qa.data.squad import load_squad, select_subset
from lit_qa.errors import LitQAError, run_cli
from lit_qa.models.adapter import AdapterConfig, apply_adapter, mark_only_adapter_as_trainable
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.training.loop import checkpoint_blocks, compile_blocks
from lit_qa.training.loss import token_loss_sum

METHODS = ("lora", "full", "adapter", "adapter_v2")  # transformers + peft runs only the first two
IMPLEMENTATIONS = ("lit-qa", "lit-qa --compile", "transformers")
OPTIONAL_IMPLEMENTATIONS = ("lit-qa --activation_checkpointing",)
LORA = LoRAConfig(r=8, alpha=16, dropout=0.05, query=True, value=True)
DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16}
# Dense datasheet peaks (TFLOP/s) by GPU name fragment: (fp32 non-tensor-core, bf16 tensor core).
DATASHEET_TFLOPS = {"H200": (67.0, 989.0), "H100": (67.0, 989.0), "A100": (19.5, 312.0), "L4": (30.3, 121.0)}


def make_batches(
    checkpoint_dir: Path, squad_file: Path, micro_batch_size: int, seq_length: int, count: int
) -> list[dict[str, torch.Tensor]]:
    """``count`` micro-batches of real SQuAD samples, each exactly ``seq_length`` tokens (right-padded)."""
    encoder = QuestionEncoder(Tokenizer(checkpoint_dir), max_seq_length=seq_length)
    samples = []
    for question in select_subset(load_squad(squad_file), None):
        sample = encoder(question).sample
        if sample is not None and len(sample["input_ids"]) > seq_length * 3 // 4:
            samples.append(sample)
        if len(samples) == micro_batch_size * count:
            break
    if len(samples) < micro_batch_size * count:
        raise LitQAError(f"{squad_file}: too few questions with prompts of about {seq_length} tokens")
    return [collate(samples[i : i + micro_batch_size], 0, seq_length, pad_multiple=seq_length)
            for i in range(0, len(samples), micro_batch_size)]  # fmt: skip


def lit_model(checkpoint_dir: Path, method: str, dtype: torch.dtype, device: str, options: str) -> torch.nn.Module:
    model, _ = load_model(checkpoint_dir, device=device, dtype=dtype)
    if method == "lora":
        apply_lora(model, LORA)
        mark_only_lora_as_trainable(model)
    elif method.startswith("adapter"):
        apply_adapter(model, AdapterConfig(version=2 if method == "adapter_v2" else 1))
        mark_only_adapter_as_trainable(model)
    if "--activation_checkpointing" in options:
        checkpoint_blocks(model)
    if "--compile" in options:
        compile_blocks(model)
    return model.train()


def hf_model(checkpoint_dir: Path, method: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    import transformers

    from lit_qa.checkpoints.convert_hf import convert_lit_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        convert_lit_to_hf(checkpoint_dir, Path(tmp) / "hf", overwrite=True)
        model = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).to(device)
    if method == "lora":
        import peft

        config = peft.LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(model, config)
    return model.train()


def hf_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The usual Hugging Face way: logits at every position, then cross-entropy on the answer tokens."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def worker(implementation: str, method: str, checkpoint_dir: Path, squad_file: Path, precision: str, device: str,
           micro_batch_size: int, seq_length: int, warmup: int, steps: int) -> dict[str, float]:  # fmt: skip
    """Time ``steps`` optimizer steps (after ``warmup``) of one implementation; return tokens/s and peak memory."""
    torch.manual_seed(0)
    batches = make_batches(checkpoint_dir, squad_file, micro_batch_size, seq_length, warmup + steps)
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    dtype = DTYPES[precision]
    if implementation == "transformers":
        model, loss_fn = hf_model(checkpoint_dir, method, dtype, device), hf_loss_sum
    else:
        model, loss_fn = lit_model(checkpoint_dir, method, dtype, device, implementation), token_loss_sum
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")
    losses, start = [], 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize() if device == "cuda" else None
            start = time.perf_counter()
        loss = loss_fn(model, batch) / (batch["labels"][:, 1:] != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    torch.cuda.synchronize() if device == "cuda" else None
    seconds = (time.perf_counter() - start) / steps
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"tokens_per_sec": micro_batch_size * seq_length / seconds, "seconds_per_step": seconds,
            "peak_memory_gb": peak, "first_loss": losses[0], "trainable": sum(p.numel() for p in trainable)}  # fmt: skip


def matmul_peak_tflops(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 5) -> float:
    """Measured peak of a large square ``torch.mm``, TFLOP/s (the best of ``repeats``)."""
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        torch.cuda.synchronize() if device == "cuda" else None
        start = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize() if device == "cuda" else None
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def flops_per_token(config: Config, seq_length: int, method: str) -> float:
    """Useful training FLOPs per token of the transformer blocks (see the module docstring)."""
    block_weights = config.n_layer * sum(
        config.n_embd * out for out in (config.n_embd, 2 * config.n_query_groups * config.head_size, config.n_embd)
    ) + config.n_layer * 3 * config.n_embd * config.intermediate_size
    attention = config.n_layer * 2 * seq_length * config.n_embd  # QK^T and AV, causal halves 4*T*C
    forward = 2 * block_weights + attention
    return forward * (3 if method == "full" else 2)  # frozen weights need input gradients only


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    squad_file: Path = Path("../shared/data/squad2/demo-train-v2.0.json"),
    methods: tuple[str, ...] = ("lora", "full"),
    implementations: tuple[str, ...] = IMPLEMENTATIONS,
    precision: str = "32-true",
    device: str = "cpu",
    micro_batch_size: int = 4,
    seq_length: int = 256,
    warmup: int = 2,
    steps: int = 5,
    out: Path = Path("out/benchmarks/train.json"),
) -> None:
    """Print tokens/s, peak memory and MFU of each implementation and method, and write them as JSON.

    Args:
        checkpoint_dir: A lit checkpoint folder.
        squad_file: Official-format SQuAD file the training prompts come from.
        methods: Any of "lora", "full", "adapter", "adapter_v2" (the last two for lit-qa only).
        implementations: Any of "lit-qa", "lit-qa --compile", "transformers", "lit-qa --activation_checkpointing".
        precision: "32-true" or "bf16-true" (weights and activations, both sides).
        device: "cpu" or "cuda".
        micro_batch_size: Samples per step.
        seq_length: Tokens per sample.
        warmup: Untimed steps first (compilation happens here).
        steps: Timed steps.
        out: Where to write the JSON results.
    """
    if precision not in DTYPES or any(m not in METHODS for m in methods):
        raise LitQAError(f"--precision must be one of {list(DTYPES)} and --methods from {', '.join(METHODS)}")
    config = Config.from_checkpoint(checkpoint_dir)
    peak = matmul_peak_tflops(DTYPES[precision], device)
    datasheet = next((v for k, v in DATASHEET_TFLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name()), None)
    rows, results = [], {}
    for method in methods:
        for implementation in implementations:
            if implementation == "transformers" and method not in ("lora", "full"):
                continue  # peft has no LLaMA-Adapter for LLaMA models
            args = [implementation, method, str(checkpoint_dir), str(squad_file), precision, device,
                    str(micro_batch_size), str(seq_length), str(warmup), str(steps)]  # fmt: skip
            run = subprocess.run([sys.executable, "-m", "benchmarks.train", "--worker", json.dumps(args)],
                                 capture_output=True, text=True)  # fmt: skip
            if run.returncode != 0:
                raise LitQAError(f"{implementation} {method} failed: {run.stderr.strip().splitlines()[-1]}")
            result = json.loads(run.stdout.strip().splitlines()[-1])
            tflops = result["tokens_per_sec"] * flops_per_token(config, seq_length, method) / 1e12
            result["mfu_measured_peak"] = tflops / peak
            if datasheet:
                result["mfu_datasheet"] = tflops / datasheet[precision == "bf16-true"]
            results[f"{implementation} {method}"] = result
            rows.append({"method": method, "implementation": implementation,
                         "tokens/s": result["tokens_per_sec"], "peak memory GB": result["peak_memory_gb"],
                         "MFU %": 100 * result["mfu_measured_peak"], "first loss": f"{result['first_loss']:.4f}"})  # fmt: skip
    for row in rows:  # ratios against the peer, once every run is in
        reference = results.get(f"transformers {row['method']}")
        mine = results[f"{row['implementation']} {row['method']}"]
        row["speed vs HF"] = f"{mine['tokens_per_sec'] / reference['tokens_per_sec']:.2f}x" if reference else "-"
        row["memory vs HF"] = f"{mine['peak_memory_gb'] / reference['peak_memory_gb']:.2f}x" if reference else "-"
    machine = describe_machine()
    print(f"{config.name}, {precision} on {device}, micro batch {micro_batch_size} x {seq_length} tokens, "
          f"{steps} timed steps; matmul peak {peak:.2f} TFLOP/s; {machine}")  # fmt: skip
    print_table(rows)
    write_results(out, {"machine": machine, "config": config.name, "precision": precision, "device": device,
                        "matmul_peak_tflops": peak, "rows": rows, "results": results})  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        impl, method, ckpt, squad, prec, dev, mbs, seq, warm, steps = json.loads(sys.argv[2])
        print(json.dumps(worker(impl, method, Path(ckpt), Path(squad), prec, dev, int(mbs), int(seq), int(warm), int(steps))))
    else:
        run_cli(main)
