# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Decoding speed: lit-qa's KV-cached greedy decoding vs Hugging Face `transformers` `generate`, same weights.

    python benchmarks/generate.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct

Both decode ``new_tokens`` tokens greedily after a ``prompt_length``-token prompt at each batch size,
in fp32 on the CPU by default. The Hugging Face model is our checkpoint exported with
`lit_qa.checkpoints.convert_hf.convert_lit_to_hf`, so the weights are identical. Stop tokens are ignored on both
sides so every row decodes exactly ``new_tokens`` tokens. Run on a quiet machine: timings on a shared
2-core machine swing by several times, so compare the ratios printed in the same run.
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


def main(
    checkpoint_dir: Path = Path("checkpoints/SmolLM2-135M-Instruct"),
    prompt_length: int = 256,
    new_tokens: int = 128,
    batch_sizes: tuple[int, ...] = (1, 8),
    repeats: int = 2,
    dtype: str = "float32",
    device: str = "cpu",
    out: Path = Path("out/benchmarks/generate.json"),
) -> None:
    """Print new tokens/s for lit-qa and transformers at each batch size, and write them as JSON.

    Args:
        checkpoint_dir: A lit checkpoint folder.
        prompt_length: Tokens in every prompt.
        new_tokens: Tokens decoded per row.
        batch_sizes: Batch sizes to measure.
        repeats: Timed runs per setting after one warm-up; the fastest counts.
        dtype: Weights and activations dtype on both sides ("float32" or "bfloat16").
        device: "cpu" or "cuda".
        out: Where to write the JSON results.
    """
    import transformers

    torch_dtype = getattr(torch, dtype)
    model, config = load_model(checkpoint_dir, device=device, dtype=torch_dtype)
    model.eval()
    model.max_seq_length = prompt_length + new_tokens
    with tempfile.TemporaryDirectory() as hf_dir:
        convert_lit_to_hf(checkpoint_dir, Path(hf_dir) / "hf", overwrite=True)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(Path(hf_dir) / "hf", dtype=torch_dtype)
    hf_model.to(device).eval()

    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in batch_sizes:
        # Random ordinary tokens: the content does not change the speed of greedy decoding.
        prompts = torch.randint(100, config.vocab_size, (batch_size, prompt_length), generator=generator).to(device)

        def ours() -> None:
            generate(model, list(prompts), new_tokens)

        def theirs() -> None:
            with torch.inference_mode():
                hf_model.generate(
                    prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                )  # fmt: skip

        ours_tps = batch_size * new_tokens / best_time(ours, repeats)
        theirs_tps = batch_size * new_tokens / best_time(theirs, repeats)
        rows.append(
            {
                "batch": batch_size,
                "lit-qa tokens/s": ours_tps,
                "transformers tokens/s": theirs_tps,
                "speed-up": f"{ours_tps / theirs_tps:.2f}x",
            }
        )
    machine = describe_machine()
    print(f"{config.name}, {dtype} on {device}, prompt {prompt_length} + {new_tokens} new tokens, {machine}")
    print_table(rows)
    write_results(out, {"machine": machine, "config": config.name, "dtype": dtype, "device": device, "rows": rows})


if __name__ == "__main__":
    run_cli(main)
