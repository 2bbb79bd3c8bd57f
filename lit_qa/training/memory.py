# Copyright lit-qa authors. Licensed under the Apache License 2.0.
"""Per-GPU memory of a fine-tuning run, worked out from the model config alone (no weights, no GPU).

Used by ``scripts/estimate_memory.py`` to plan a run before renting GPUs. Bytes are summed in six parts;
the rules, with w = bytes per weight value (4 under 32-true and the -mixed precisions, 2 under bf16-true
and 16-true) and a = bytes per activation value (4 under 32-true, else 2):

* **weights**: every parameter in w bytes. -mixed keeps fp32 weights: they *are* the fp32 master copy,
  so there is no second one. QLoRA stores the block linear layers in nf4, 0.5 byte per value plus an fp32
  absmax per block of 64 (0.0625 byte; double quantization ignored); embeddings, norms, the head and the
  LoRA tensors stay in w bytes. LoRA adds r x (in + out) per adapted layer. LLaMA-Adapter (`lit_qa.models.adapter`)
  adds a prompt of ``adapter_prompt_length`` x n_embd and a gate per head in each layer from
  ``adapter_start_layer`` on; v2 adds a bias and a scale vector per linear layer (the head included) and trains
  the RMSNorm weights.
* **gradients**: trainable parameters only, in w bytes (fp32 under -mixed, since the weights are fp32).
  DDP on several devices adds one more copy: its gradient buckets (Lightning leaves
  ``gradient_as_bucket_view`` off).
* **optimizer states**: AdamW's exp_avg and exp_avg_sq, 2 x w bytes per trainable parameter.
* **activations**: what autograd keeps for the backward pass, per token (see `block_activation_bytes` for the
  tensor-by-tensor formula of one `Block`), plus the final norm and the logits at the loss positions
  (micro batch x ``answer_tokens`` rows of the vocabulary: logits, fp32 log-probabilities and the gradients
  of both), plus the gradients in flight during one block's backward pass (about (2 n_embd +
  3 intermediate_size) x a per token) and LLaMA-Adapter's prompt keys and values (per layer, not per token).
  With activation checkpointing only each block's input survives the forward pass, plus one block's full
  activations while it is recomputed. Under -mixed, autocast's bf16 copies of the linear weights are kept for
  the backward pass too: 2 bytes per linear weight (one block's worth with checkpointing), whatever the
  sharding, since they are copies of the gathered weights — except bf16-mixed under FSDP, where FSDP gathers
  the weights in bf16 itself and autocast has nothing to copy.
* **transient**: under FSDP, two blocks' gathered parameters (the one computing and the one prefetched), one
  block's unsharded gradients before the reduce-scatter, and the embedding/head, which lit_qa keeps gathered
  from forward to backward (``reshard_after_forward=False`` for the root in `lit_qa.training.distributed`). Under
  QLoRA, one weight matrix dequantized at a time.
* **overhead**: a fixed 1 GB on GPUs: the CUDA context (~0.5 GB), cuBLAS/NCCL workspaces and the caching
  allocator's slack. On CPU, the process's baseline RSS instead: 0.36 GB measured for
  ``import torch, lit_qa.training.loop`` (which loads Lightning; ``import torch, lit_qa`` alone is 0.23 GB).

FSDP (``--strategy fsdp``) divides weights, gradients and optimizer states by the world size (devices x
nodes); DDP replicates them. One device is a plain single-device run whatever the strategy.

The sum assumes gradient accumulation: the gradients of one micro-batch are alive during the next one's
forward pass, so gradients, optimizer states and activations all coexist. A run that steps the optimizer
after every micro-batch peaks lower, by up to the gradients' size. Not counted: the optimizer's temporaries on
CPU (the fused CUDA AdamW has none) and the data loader.

Checked on this repo's CPU machine (SmolLM2-135M-Instruct, 32-true, micro batch 4 x 256 tokens, LoRA r8 on
q,v with dropout 0.05, AdamW; ``python -m benchmarks.train --steps 2 --warmup 1``, which steps the optimizer
after every micro-batch; estimates with ``--accelerator cpu``; GB = 1e9 bytes):

==========================  ========  =====================  ===========================================
case                        estimate  measured peak RSS      measured, ``MALLOC_MMAP_THRESHOLD_=131072``
==========================  ========  =====================  ===========================================
LoRA                        2.14      3.34 (estimate -36 %)  2.15 (-0 %)
full                        3.94      4.60 (-14 %)           3.53 (+12 %)
LoRA, act. checkpointing    1.07      1.5 (-29 %)            1.09 (-2 %)
full, act. checkpointing    2.68      3.3 (-19 %)            2.80 (-4 %)
==========================  ========  =====================  ===========================================

The activation formula is exact on CPU: it equals the bytes autograd saves, counted with
``saved_tensors_hooks``, in 32-true and bf16-true for full, LoRA, adapter and adapter_v2 (``tests/test_memory.py``
checks full and LoRA). The default-allocator peaks are
higher because of glibc: tensors under its mmap threshold, which it raises itself up to 32 MB after the first
frees, come from the heap, and the freed activations of one step stay resident, so the RSS creeps up from step
to step (LoRA: 2.17, 2.92, 3.19 GB after steps 1-3). With the threshold fixed, freed memory goes back to the
system and the peaks match the estimate. What remains: full fine-tuning is 0.4 GB high because the benchmark
never has gradients and activations at the same time (no accumulation, see above), and full with
checkpointing peaks at the first optimizer step, where CPU AdamW's temporaries sit on top of the new states.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lit_qa.errors import LitQAError
from lit_qa.models.config import Config

GB = 1e9
METHODS = ("full", "lora", "adapter", "adapter_v2", "qlora")
PRECISIONS = ("32-true", "bf16-true", "16-true", "bf16-mixed", "16-mixed")
STRATEGIES = ("auto", "ddp", "fsdp")
ACCELERATORS = ("cuda", "cpu")
# LoRA target name -> the block linear layers it adapts ("head" is the output head, outside the blocks).
LORA_TARGETS = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "mlp": ("gate", "up", "down"), "head": ()}
NF4_BYTES = 0.5 + 4 / 64  # 4-bit values plus one fp32 absmax per block of 64
CUDA_OVERHEAD_BYTES = 1.0 * GB
CPU_BASELINE_BYTES = 0.36 * GB


@dataclass
class TrainingSetup:
    """A fine-tuning run as far as memory goes; the flags of ``scripts/estimate_memory.py``.

    Attributes:
        method: "full", "lora", "adapter", "adapter_v2" or "qlora".
        precision: A Fabric precision: "32-true", "bf16-true", "16-true", "bf16-mixed" or "16-mixed".
        micro_batch_size: Samples per forward/backward pass on one device.
        seq_length: Tokens per sample (padded length).
        devices: Devices per node.
        num_nodes: Nodes.
        strategy: "ddp" (replicate; "auto" means the same) or "fsdp" (shard over all devices).
        activation_checkpointing: Recompute each block's activations in the backward pass.
        lora_r: LoRA rank.
        lora_targets: Layers LoRA adapts, from q, k, v, o, mlp, head.
        lora_dropout: Dropout on the LoRA path (its mask costs memory).
        adapter_prompt_length: LLaMA-Adapter prompt tokens per adapted layer.
        adapter_start_layer: First adapted layer.
        answer_tokens: Average loss tokens per sample: the head runs only there.
        accelerator: "cuda" (fixed overhead, bool dropout masks, fused attention) or "cpu" (baseline RSS).
    """

    method: str = "lora"
    precision: str = "bf16-true"
    micro_batch_size: int = 4
    seq_length: int = 512
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "ddp"
    activation_checkpointing: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_dropout: float = 0.05
    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2
    answer_tokens: int = 8
    accelerator: str = "cuda"

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world_size > 1

    @property
    def weight_bytes(self) -> int:
        return 2 if self.precision in ("bf16-true", "16-true") else 4

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "32-true" else 2

    @property
    def lora_layers(self) -> set[str]:
        """Block linear layers with LoRA (none unless the method is lora or qlora)."""
        if self.method not in ("lora", "qlora"):
            return set()
        return {layer for target in self.lora_targets for layer in LORA_TARGETS[target]}

    def validate(self, config: Config) -> None:
        """Raise one `LitQAError` listing every out-of-range value."""
        problems = []
        for name, allowed in (("method", METHODS), ("precision", PRECISIONS), ("strategy", STRATEGIES),
                              ("accelerator", ACCELERATORS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                problems.append(f"--{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("micro_batch_size", "seq_length", "devices", "num_nodes", "lora_r", "adapter_prompt_length",
                     "answer_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_length > config.block_size:
            problems.append(f"--seq_length {self.seq_length} exceeds {config.name}'s block_size {config.block_size}")
        if self.answer_tokens > self.seq_length:
            problems.append(f"--answer_tokens {self.answer_tokens} exceeds --seq_length {self.seq_length}")
        # Settings of another method than the one estimated are ignored, not checked.
        if self.method in ("adapter", "adapter_v2") and not 0 <= self.adapter_start_layer < config.n_layer:
            problems.append(f"--adapter_start_layer must be in 0..{config.n_layer - 1}, got {self.adapter_start_layer}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if self.method in ("lora", "qlora") and (unknown or not self.lora_targets):
            known = ", ".join(LORA_TARGETS)
            problems.append(f"--lora_targets must be a non-empty list from {known}; got {unknown or 'none'}")
        if self.method in ("lora", "qlora") and not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.method == "qlora" and self.precision.endswith("-mixed"):
            problems.append("qlora computes in its weights' dtype: use a -true precision (bf16-true)")
        if problems:
            raise LitQAError("; ".join(problems))


@dataclass
class ParameterCounts:
    """Parameters of the base model and of what the method adds, and how many of them train."""

    block_linear: int  # the linear layers of all blocks (what QLoRA quantizes)
    other: int  # embedding, untied head, RMSNorm weights
    added: int  # LoRA or adapter parameters
    trainable: int

    @property
    def total(self) -> int:
        return self.block_linear + self.other + self.added


@dataclass
class MemoryEstimate:
    """Bytes per GPU (per process on CPU), by what holds them; see the module docstring for the rules."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.transient + self.overhead


def block_linear_shapes(config: Config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one `Block`, by short name."""
    C, I = config.n_embd, config.intermediate_size
    H, G = config.n_head * config.head_size, config.n_query_groups * config.head_size
    return {"q": (C, H), "k": (C, G), "v": (C, G), "o": (H, C), "gate": (C, I), "up": (C, I), "down": (I, C)}


def parameter_counts(config: Config, setup: TrainingSetup) -> ParameterCounts:
    """Parameter counts of ``config`` under ``setup.method`` (a tied embedding counted once)."""
    C, V, L = config.n_embd, config.padded_vocab_size, config.n_layer
    linears = block_linear_shapes(config)
    block_linear = L * sum(i * o for i, o in linears.values())
    norms = (2 * L + 1) * C
    other = V * C * (1 if config.tie_embeddings else 2) + norms
    adapted_layers = L - setup.adapter_start_layer
    added, trainable = 0, 0
    if setup.method == "full":
        trainable = block_linear + other
    elif setup.method in ("lora", "qlora"):
        added = L * sum(setup.lora_r * sum(linears[layer]) for layer in setup.lora_layers)
        added += setup.lora_r * (C + V) if "head" in setup.lora_targets else 0
        trainable = added
    else:
        added = adapted_layers * (setup.adapter_prompt_length * C + config.n_head)  # prompt, gate per head
        if setup.method == "adapter_v2":
            added += 2 * (L * sum(o for _, o in linears.values()) + V)  # bias and scale per linear, head included
        trainable = added + (norms if setup.method == "adapter_v2" else 0)
    return ParameterCounts(block_linear, other, added, trainable)


def block_activation_bytes(config: Config, setup: TrainingSetup, adapted: bool = False) -> float:
    """Bytes autograd keeps per token for one ``Block.forward`` of `lit_qa.models.model` (training, no checkpointing).

    With C = n_embd, H = n_head x head_size, G = n_query_groups x head_size (k and v each), I = intermediate_size,
    a = compute bytes, s = residual-stream bytes (4 under -mixed, whose residual stream stays fp32):

    - each RMSNorm (2): its input in fp32 (4C, the copy ``x.float()``, or the input itself if already fp32) and
      rsqrt(mean(x^2)) (4); with trainable norm weights also the normalised x (sC), for the weight's gradient
    - fused attention: q and k after RoPE, v, the output (a(2H + 2G)) and the logsumexp (4 n_head). On CUDA,
      32-true with GQA falls back to the math kernel (no fp32 GQA flash kernel): q, repeated k and v, the output
      (4 x 4H) and the attention probabilities (4 n_head T)
    - linear layers (`_linear_inputs`): a trainable weight keeps its input (aC for q/k/v, aH for o: the attention
      output, already counted, aC for gate/up, aI for down); a LoRA layer keeps its dropout mask and dropped input
      ((mask + a) x in) and x A^T (a r)
    - SwiGLU: the gate output (for silu), silu's output and the up output (for the product): 3aI
    - LLaMA-Adapter layers: the prompt attention's output (aH, kept for the gate) and logsumexp (4 n_head)
    - LLaMA-Adapter v2: each linear's output before its scale (the sum of out_features, in a; fp32 under -mixed)
    """
    C, I, nh, T = config.n_embd, config.intermediate_size, config.n_head, setup.seq_length
    H, G = config.n_head * config.head_size, config.n_query_groups * config.head_size
    a, s = setup.compute_bytes, setup.weight_bytes  # the residual stream is in the weights' dtype
    norms_train = setup.method in ("full", "adapter_v2")
    total = 2 * (4 * C + 4 + (s * C if norms_train else 0))
    if setup.accelerator == "cuda" and setup.precision == "32-true" and G < H:
        total += 4 * (4 * H + nh * T)
    else:
        total += a * (2 * H + 2 * G) + 4 * nh
    total += _linear_inputs(setup, C, ("q", "k", "v"), s, already_saved=False)
    total += _linear_inputs(setup, H, ("o",), a, already_saved=True)
    total += _linear_inputs(setup, C, ("gate", "up"), s, already_saved=False)
    total += _linear_inputs(setup, I, ("down",), a, already_saved=False)
    total += 3 * a * I
    if adapted:
        total += a * H + 4 * nh
    if setup.method == "adapter_v2":
        outputs = sum(o for _, o in block_linear_shapes(config).values())
        total += (4 if setup.precision.endswith("-mixed") else a) * outputs
    return total


def _linear_inputs(
    setup: TrainingSetup, width: int, names: tuple[str, ...], in_bytes: int, already_saved: bool
) -> float:
    """Bytes per token that the linear layers ``names``, all reading one input of ``width`` values stored in
    ``in_bytes`` each, keep of it for their backward pass."""
    a = setup.compute_bytes
    lora = setup.lora_layers
    keep_input = [n for n in names if setup.method == "full" or (n in lora and setup.lora_dropout == 0)]
    total = 0.0
    if keep_input and not already_saved:
        # Layers reading the same tensor share it; under -mixed each keeps its own bf16 cast of the fp32 input.
        total += a * width * (1 if in_bytes == a else len(keep_input))
    mask = 1 if setup.accelerator == "cuda" else in_bytes  # dropout masks are bool on CUDA, the input's dtype on CPU
    for name in names:
        if name in lora:
            total += (mask + a) * width if setup.lora_dropout > 0 else 0
            total += a * setup.lora_r
    return total


def activation_bytes(config: Config, setup: TrainingSetup) -> float:
    """Activation bytes of one micro-batch: the blocks, the final norm, the gradients in flight, the logits at the
    loss positions and, under -mixed, autocast's weight copies (see the module docstring)."""
    C, V = config.n_embd, config.padded_vocab_size
    a, s = setup.compute_bytes, setup.weight_bytes
    adapter = setup.method in ("adapter", "adapter_v2")
    per_layer = [block_activation_bytes(config, setup, adapter and i >= setup.adapter_start_layer)
                 for i in range(config.n_layer)]  # fmt: skip
    if setup.activation_checkpointing:
        per_token = config.n_layer * s * C + max(per_layer)  # every block's input, one block recomputed
    else:
        per_token = sum(per_layer)
    per_token += 4 * C + 4 + (s * C if setup.method in ("full", "adapter_v2") else 0)  # final RMSNorm
    # Gradients in flight while one block runs backward (roughly: the residual's, incoming and outgoing, and the
    # MLP's three intermediate ones). Small next to stored activations, but not next to checkpointed ones.
    per_token += a * (2 * C + 3 * config.intermediate_size)
    tokens = setup.micro_batch_size * setup.seq_length
    # Logits, their fp32 log-softmax (kept by cross-entropy) and, in the backward pass, the gradients of both.
    logits = setup.micro_batch_size * setup.answer_tokens * V * (2 * a + 8)
    layers_kept = 1 if setup.activation_checkpointing else config.n_layer
    # The adaption prompt's keys and values, repeated per query head (v2: also before their scale): per adapted
    # layer, not per token.
    v2_width = config.n_query_groups * config.head_size if setup.method == "adapter_v2" else 0
    prompt = 2 * setup.adapter_prompt_length * (config.n_head * config.head_size + v2_width) * a if adapter else 0
    prompt *= min(layers_kept, config.n_layer - setup.adapter_start_layer)
    casts = 0.0
    # Under FSDP with bf16-mixed, FSDP itself gathers the weights in bf16 (MixedPrecisionPolicy in
    # lit_qa.training.distributed), so autocast finds them in bf16 already and makes no copies.
    fsdp_casts_in_gather = setup.strategy == "fsdp" and setup.precision == "bf16-mixed"
    if setup.precision.endswith("-mixed") and not fsdp_casts_in_gather:
        linear = sum(i * o for i, o in block_linear_shapes(config).values())
        casts = 2 * (linear * layers_kept + V * C)
    return tokens * per_token + logits + prompt + casts


def estimate_memory(config: Config, setup: TrainingSetup) -> MemoryEstimate:
    """Per-GPU memory of fine-tuning ``config`` as ``setup`` says, by part (see the module docstring).

    Raises:
        LitQAError: If a setting is out of range (all problems in one message).
    """
    setup.validate(config)
    counts = parameter_counts(config, setup)
    w, a, world = setup.weight_bytes, setup.compute_bytes, setup.world_size
    linear_bytes = NF4_BYTES if setup.method == "qlora" else w
    weights = counts.block_linear * linear_bytes + (counts.other + counts.added) * w
    gradients = counts.trainable * w
    optimizer = 2 * counts.trainable * w
    shard = world if setup.sharded else 1
    weights, gradients, optimizer = weights / shard, gradients / shard, optimizer / shard
    if world > 1 and not setup.sharded:
        gradients *= 2  # DDP's gradient buckets hold a second copy
    transient = 0.0
    if setup.sharded:
        L = config.n_layer
        block_weights = (counts.block_linear * linear_bytes + (counts.added + 2 * L * config.n_embd) * w) / L
        root = config.padded_vocab_size * config.n_embd * (1 if config.tie_embeddings else 2) * w
        transient = 2 * block_weights + counts.trainable * w / L + root * (1 - 1 / world)
    if setup.method == "qlora":
        transient += a * max(i * o for i, o in block_linear_shapes(config).values())
    overhead = CUDA_OVERHEAD_BYTES if setup.accelerator == "cuda" else CPU_BASELINE_BYTES
    return MemoryEstimate(weights, gradients, optimizer, activation_bytes(config, setup), transient, overhead)


def largest_micro_batch(config: Config, setup: TrainingSetup, memory_bytes: float) -> int:
    """The largest micro batch whose estimate fits in ``memory_bytes`` per GPU; 0 if not even one sample fits.

    Everything but the activations is independent of the micro batch, and activations grow linearly with it.
    """
    one = estimate_memory(config, replace(setup, micro_batch_size=1)).total
    per_sample = estimate_memory(config, replace(setup, micro_batch_size=2)).total - one
    return max(0, int((memory_bytes - (one - per_sample)) // per_sample))
