# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Quantize a lit-qa checkpoint to 4-bit (or 8-bit) weights with GPTQ, in plain PyTorch.

Calibration data is either a prepared SQuAD folder (the prompts of its training samples, so the model is
calibrated on what it will see) or any plain-text file, cut into chunks::

    python scripts/quantize_gptq.py --checkpoint_dir checkpoints/SmolLM2-135M-Instruct \\
        --calibration data/squad2-demo --out_dir checkpoints/SmolLM2-135M-Instruct-gptq-int4

    # also write a copy AutoGPTQ / GPTQModel / transformers can load
    python scripts/quantize_gptq.py ... --export_hf checkpoints/SmolLM2-135M-Instruct-gptq-int4-hf

The output folder is read by `lit_qa.checkpoints.gptq.load_gptq_model`. The embeddings, norms and output head
stay unquantized, as is usual for GPTQ. Nothing is downloaded.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

from lit_qa.checkpoints.convert_hf import tokenizer_files
from lit_qa.checkpoints.folder import check_checkpoint_dir, check_not_inside, load_model
from lit_qa.checkpoints.gptq import export_hf_gptq, gptq_state_dict, save_gptq_checkpoint
from lit_qa.data.dataset import IGNORE_INDEX, load_prepared
from lit_qa.errors import LitQAError, not_found, run_cli
from lit_qa.files import check_out_dir
from lit_qa.models.config import Config
from lit_qa.models.tokenizer import Tokenizer
from lit_qa.quantize.gptq import GPTQConfig
from lit_qa.quantize.gptq_model import LayerReport, gptq_quantize_model, packed_size, summarize


def main(
    checkpoint_dir: Path,
    out_dir: Path,
    calibration: Path,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    n_samples: int = 128,
    seq_length: int = 512,
    seed: int = 1337,
    device: str = "auto",
    export_hf: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Quantize a checkpoint with GPTQ and write a GPTQ checkpoint folder.

    Arguments:
        checkpoint_dir: The lit-qa checkpoint folder to quantize.
        out_dir: The folder to write (model.safetensors with packed weights, lit_config.json,
            quantize_config.json, tokenizer files).
        calibration: A folder written by scripts/prepare_squad.py (its training prompts are used), or a .txt file
            (tokenized and cut into chunks of seq_length tokens).
        bits: Bits per weight: 4 or 8.
        group_size: Input columns per scale/zero point: 32, 64, 128, or -1 for one group per output row.
        sym: Symmetric quantization (fixed zero point); false fits a zero point per group.
        act_order: Quantize columns in order of decreasing activation energy ("desc_act"); often a little more
            accurate. Still uses the int4 kernel on CPU (the input is permuted each call).
        damp_percent: Damping added to the Hessian diagonal, as a fraction of its mean.
        true_sequential: Quantize each layer with inputs that went through the already quantized layers of its
            block (slower: 5 instead of 2 passes per block).
        n_samples: Number of calibration sequences (a few hundred is usual; 128 keeps CPU runs short).
        seq_length: Longest calibration sequence in tokens.
        seed: Seed for picking the calibration samples.
        device: Where each block is quantized: "auto" (cuda if available), "cpu", "cuda", "cuda:1" ...
        export_hf: Also write a copy with Hugging Face / AutoGPTQ tensor names and config.json to this folder.
        overwrite: Replace non-empty output folders.
    """
    config = GPTQConfig(bits, group_size, sym, act_order, damp_percent, true_sequential)
    if n_samples <= 0 or seq_length <= 1:
        raise LitQAError(f"n_samples ({n_samples}) must be positive and seq_length ({seq_length}) at least 2")
    check_folders(checkpoint_dir, out_dir, calibration, export_hf, overwrite)
    device = available_device(device)

    model_config = Config.from_checkpoint(checkpoint_dir)
    # Calibration data first: a bad file should fail before a large model is loaded.
    samples = load_calibration(calibration, checkpoint_dir, n_samples, min(seq_length, model_config.block_size), seed)
    if max(int(s.max()) for s in samples) >= model_config.padded_vocab_size:
        raise LitQAError(
            f"{calibration} holds token ids outside the model's vocabulary; was it tokenized for another model?"
        )
    model, _ = load_model(checkpoint_dir)
    n_tokens = sum(len(s) for s in samples)
    print(f"calibrating on {len(samples)} sequences ({n_tokens} tokens) from {calibration}", file=sys.stderr)
    print(f"GPTQ {config} on {device}", file=sys.stderr)

    start = time.perf_counter()
    packed, reports = gptq_quantize_model(model, samples, config, device)
    seconds = time.perf_counter() - start

    state = gptq_state_dict(model, packed)
    quantize_config = config.to_quantize_config(str(checkpoint_dir))
    save_gptq_checkpoint(out_dir, model_config, state, quantize_config, tokenizer_files(checkpoint_dir), overwrite)
    if export_hf is not None:
        export_hf_gptq(out_dir, export_hf, overwrite)

    print_report(reports, packed, seconds, [out_dir] if export_hf is None else [out_dir, export_hf])
    return Path(out_dir)


def check_folders(
    checkpoint_dir: Path, out_dir: Path, calibration: Path, export_hf: Path | None, overwrite: bool
) -> None:
    """Refuse a missing checkpoint, and output folders that are not empty (without ``overwrite``) or that lie inside
    an input, before anything is loaded."""
    check_checkpoint_dir(checkpoint_dir)
    check_out_dir(out_dir, overwrite)
    check_not_inside(out_dir, {"--checkpoint_dir": checkpoint_dir, "--calibration": calibration})
    if export_hf is not None:
        check_out_dir(export_hf, overwrite)
        inputs = {"--checkpoint_dir": checkpoint_dir, "--calibration": calibration, "--out_dir": out_dir}
        check_not_inside(export_hf, inputs, "--export_hf")


def print_report(
    reports: list[LayerReport], packed: dict[str, dict[str, torch.Tensor]], seconds: float, written: list[Path]
) -> None:
    """Each layer's error (`summarize`), the time taken, the packed size against float16, and the folders written."""
    print(summarize(reports))
    size, fp16 = packed_size(packed)
    gptq_seconds = sum(r.seconds for r in reports)
    print(f"quantized {len(reports)} linear layers in {seconds:.1f} s ({gptq_seconds:.1f} s in GPTQ itself)")
    print(f"quantized weights: {size / 1e6:.2f} MB vs {fp16 / 1e6:.2f} MB in float16 ({fp16 / size:.2f}x smaller)")
    for folder in written:
        total = sum(p.stat().st_size for p in Path(folder).iterdir())
        print(f"wrote {folder} ({total / 1e6:.1f} MB)")


def available_device(device: str) -> torch.device:
    """``auto`` means CUDA when available; anything else must name a device this machine has."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise LitQAError(f"--device {device!r} is not a device name (try auto, cpu, cuda, cuda:1)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LitQAError(f"--device {device}: CUDA is not available on this machine")
    return resolved


def load_calibration(
    source: Path, checkpoint_dir: Path, n_samples: int, seq_length: int, seed: int
) -> list[torch.Tensor]:
    """Calibration token sequences: prompts of a prepared SQuAD folder, or chunks of a .txt file.

    Raises:
        LitQAError: If ``source`` does not exist, is not a prepared folder or a .txt file, or holds no text.
    """
    source = Path(source)
    rng = random.Random(seed)
    if source.is_dir():
        # The prompt is the part of a sample that carries no loss (labels == -100); it ends where the answer starts.
        prompts = [s["input_ids"][s["labels"] == IGNORE_INDEX] for s in load_prepared(source, "train")]
        return [p[:seq_length] for p in rng.sample(prompts, min(n_samples, len(prompts)))]
    if not source.is_file():
        raise LitQAError(f"calibration data {source} {not_found(source, 'file')}")
    if source.suffix != ".txt":
        raise LitQAError(f"calibration data {source} must be a prepared data folder or a .txt file")
    tokenizer = Tokenizer(checkpoint_dir)
    ids = tokenizer.encode(source.read_text(encoding="utf-8"), bos=False)
    if ids.numel() == 0:
        raise LitQAError(f"calibration file {source} holds no text")
    # Each chunk starts with BOS when the model expects one, like every sequence it sees at inference.
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    step = seq_length - len(bos)
    chunks = [torch.tensor(bos + ids[i : i + step].tolist()) for i in range(0, len(ids), step)]
    return rng.sample(chunks, min(n_samples, len(chunks)))


if __name__ == "__main__":
    run_cli(main)
