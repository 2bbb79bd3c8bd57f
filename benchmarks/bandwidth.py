# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Decoding against the memory-bandwidth limit: how many of the machine's bytes per second each mode uses.

    python -m benchmarks.bandwidth --checkpoint_dir checkpoints/SmolLM2-135M-Instruct

Decoding one token reads every weight once, so a decode step cannot be faster than (weight bytes) / (memory
bandwidth). This measures the machine's bandwidth (the fastest of several reductions over a tensor far larger
than the caches, with the threads decoding uses), then for each decode mode greedy tokens/s at batch 1 and
what that means in weight bytes read per second: ``achieved GB/s = weight bytes x tokens/s``, and its fraction
of the measured bandwidth. The weight bytes are `lit_qa.quantize.weights_size_bytes` (the tied embedding /
output head counted once: the head's matmul reads all of it every step, the embedding lookup one row).
Transformers' fp32 decoding of the same weights is the peer. Run on a quiet machine.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.utils import best_time, describe_machine, print_table, write_results
from lit_qa.checkpoints.convert_hf import convert_lit_to_hf
from lit_qa.checkpoints.folder import load_model
from lit_qa.errors import run_cli
from lit_qa.generation.generate import generate
from lit_qa.models.config import Config
from lit_qa.precision import cpu_has_native_bf16
from lit_qa.quantize import weights_size_bytes
from lit_qa.quantize.weight_only import quantize_weight_only


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    prompt_length: int = 128,
    new_tokens: int = 64,
    batch_sizes: tuple[int, ...] = (1, 8),
    modes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4"),
    repeats: int = 3,
    bandwidth_gb: float = 2.0,
    out: Path = Path("out/benchmarks/bandwidth.json"),
) -> None:
    """Print the machine's memory bandwidth and, per decode mode and batch size, tokens/s and weight GB/s.

    Args:
        checkpoint_dir: A lit checkpoint folder.
        prompt_length: Tokens in every prompt.
        new_tokens: Tokens decoded per row.
        batch_sizes: Batch sizes to decode at (the bandwidth fraction is computed for batch 1).
        modes: "fp32", "bf16" (bf16 weights and activations), "int8" / "int4" (weight-only, bf16 activations),
            all greedy with a KV cache; on a CPU without native bf16 every "bf16" above is fp32 (as
            ``--precision auto`` decides).
        repeats: Timed runs per setting after one warm-up; the fastest counts.
        bandwidth_gb: Size of the tensor the bandwidth is measured on.
        out: Where to write the JSON results.
    """
    bandwidth = measure_bandwidth(bandwidth_gb, repeats)
    print(f"memory bandwidth (reading {bandwidth_gb:.1f} GB, {torch.get_num_threads()} threads): {bandwidth:.1f} GB/s")
    vocab_size = Config.from_checkpoint(checkpoint_dir).vocab_size
    generator = torch.Generator().manual_seed(0)
    # Random ordinary tokens: the content does not change the speed of greedy decoding.
    prompts = {b: torch.randint(vocab_size // 4, vocab_size, (b, prompt_length), generator=generator)
               for b in batch_sizes}  # fmt: skip
    rows = [peer_row(checkpoint_dir, prompts, new_tokens, repeats)]
    for mode in modes:
        model = load_mode(checkpoint_dir, mode)
        model.max_seq_length = prompt_length + new_tokens
        weight_bytes = weights_size_bytes(model)
        row = {"mode": mode, "weights MB": weight_bytes / 1e6}
        for batch, prompt in prompts.items():
            seconds = best_time(lambda: generate(model, list(prompt), new_tokens), repeats)
            row[f"tokens/s b{batch}"] = batch * new_tokens / seconds
        decode_seconds = decode_step_seconds(model, prompts[batch_sizes[0]][:1], new_tokens, repeats)
        row["weight GB/s b1"] = weight_bytes / decode_seconds / 1e9
        row["of bandwidth"] = f"{100 * row['weight GB/s b1'] / bandwidth:.0f} %"
        rows.append(row)
    for row in rows[1:]:
        for batch in batch_sizes:
            row[f"vs transformers b{batch}"] = f"{row[f'tokens/s b{batch}'] / rows[0][f'tokens/s b{batch}']:.2f}x"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    rows = [{key: row.get(key, "-") for key in columns} for row in rows]
    machine = describe_machine()
    print(f"prompt {prompt_length} + {new_tokens} new tokens, {machine}")
    print_table(rows)
    write_results(out, {"machine": machine, "bandwidth_gb_s": bandwidth, "rows": rows})


def measure_bandwidth(size_gb: float, repeats: int) -> float:
    """GB/s of reading a float32 tensor of ``size_gb`` once (a sum: one read per element, nothing written)."""
    x = torch.ones(int(size_gb * 1e9 / 4), dtype=torch.float32)
    seconds = best_time(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds / 1e9


def load_mode(checkpoint_dir: Path, mode: str) -> torch.nn.Module:
    """The checkpoint in one decode mode (see `main`)."""
    half = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    dtype = torch.float32 if mode == "fp32" else half
    model, _ = load_model(checkpoint_dir, dtype=dtype)
    if mode in ("int8", "int4"):
        quantize_weight_only(model, mode)
    return model.eval()


def decode_step_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Seconds per decoding step at batch 1, prefill excluded: the time of ``new_tokens`` steps minus one step."""
    full = best_time(lambda: generate(model, list(prompt), new_tokens), repeats)
    prefill = best_time(lambda: generate(model, list(prompt), 1), repeats)
    return (full - prefill) / (new_tokens - 1)


def peer_row(checkpoint_dir: Path, prompts: dict[int, torch.Tensor], new_tokens: int, repeats: int) -> dict:
    """Transformers' fp32 greedy decoding of the same weights (our checkpoint exported to Hugging Face)."""
    import transformers

    with tempfile.TemporaryDirectory() as hf_dir:
        convert_lit_to_hf(checkpoint_dir, Path(hf_dir) / "hf", overwrite=True)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(Path(hf_dir) / "hf", dtype=torch.float32).eval()
    row = {"mode": "transformers fp32", "weights MB": weights_size_bytes(hf_model) / 1e6}
    for batch, prompt in prompts.items():

        def theirs() -> None:
            with torch.inference_mode():
                hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip

        row[f"tokens/s b{batch}"] = batch * new_tokens / best_time(theirs, repeats)
    return row


if __name__ == "__main__":
    run_cli(main)
