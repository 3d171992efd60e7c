"""Bytes per GPU of a LoRA fit: pure arithmetic over a :class:`rega.plan.shape.Shape` (no torch, no model).

What is counted, per GPU (the formulas are in each function's docstring):

* frozen base weights in the model's dtype, or NF4 for ``load_in_4bit``; LoRA weights, their gradients and
  AdamW's two states in fp32 (:mod:`rega.modules.precision` keeps them fp32 under bf16-true too);
* the layout's own buffers: DDP's gradient buckets, FSDP2's unsharded root unit and all-gathered layers;
* the activations autograd keeps for one micro-batch (with and without gradient checkpointing), the LM head's
  logits on the response positions, and a fixed CUDA context allowance.

The saved-tensor lists behind the activation formulas were read from this project's own forward
(``decoder_hidden_states`` with :mod:`rega.modules.fast_lora`) by walking the autograd graph of tiny models;
``tests/test_plan.py`` compares the total with a measured CPU step (fp32: LLaMA +7..+13 %; BLOOM -9..-13 %, as CPU
SDPA with a float bias keeps probabilities that CUDA's kernel does not). One H100 comparison during development
(LLaMA, bf16 autocast) came to 0.99x (checkpointing) and 1.03x (without) of ``max_memory_allocated``;
``scripts/gpu_check.py`` records the comparison (``planned_peak_gib``) on the next GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rega.plan.shape import Shape

GIB = 2**30
FP32 = 4
# NF4 with double quantization: 4-bit codes, an 8-bit absmax per 64 weights, an fp32 scale per 256 absmaxes.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
CONTEXT_BYTES = 1.0 * GIB  # CUDA context, cuBLAS and NCCL workspaces: outside PyTorch's allocator


@dataclass(frozen=True)
class Precision:
    """Byte widths of one fit.

    Args:
        weight: a frozen base weight (2 for bf16/fp16, 4 for fp32); 4-bit weights are ``NF4_BYTES``.
        activation: a saved activation (the compute dtype: 2 under bf16/fp16 weights or a 16-bit autocast).
        lora_input: the copy of an adapter's input its A matmul keeps: fp32, 2 under autocast.
        mask: a dropout mask element: 4 for the project's fused LoRA (an fp32 mask), 1 for peft's own forward
            (CUDA's bool mask), 0 without LoRA dropout.
        four_bit: ``load_in_4bit``; its non-quantized weights are fp32 (peft's k-bit preparation casts them).
        fused_lora: :mod:`rega.modules.fast_lora` runs the adapters (one mask per distinct input).
    """

    weight: int
    activation: int
    lora_input: int
    mask: int
    four_bit: bool = False
    fused_lora: bool = True


@dataclass(frozen=True)
class Batch:
    """One micro-batch: ``rows`` packed rows of ``length`` tokens, ``response_share`` of whose positions predict a
    response token (the LM head runs on those only)."""

    rows: int
    length: int
    response_share: float = 1.0

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @property
    def responses(self) -> int:
        return math.ceil(self.tokens * self.response_share)


@dataclass(frozen=True)
class Layout:
    """How weights are spread: ``shards`` ranks split each weight (1 for DDP), over ``nodes`` x ``gpus_per_node``."""

    name: str
    shards: int
    nodes: int
    gpus_per_node: int


LAYOUTS = ("ddp", "fsdp2", "hsdp")


def layout_of(name: str, nodes: int, gpus_per_node: int) -> Layout:
    """DDP: whole on each GPU; FSDP2: sharded over all GPUs; HSDP: sharded within a node, replicated across."""
    shards = {"ddp": 1, "fsdp2": nodes * gpus_per_node, "hsdp": gpus_per_node}[name]
    return Layout(name, shards, nodes, gpus_per_node)


# --- activations, bytes per token ------------------------------------------------------------------------
def lora_saved(shape: Shape, p: Precision) -> float:
    """Per token and layer: each adapter input's dropout mask and the copy its A matmul keeps, plus each
    adapter's A output (rank r) kept for B's gradient."""
    inputs = shape.lora_inputs_fused if p.fused_lora else shape.lora_inputs_each
    return (
        sum(inputs) * (p.mask + p.lora_input) + len(shape.lora_inputs_each) * shape.lora_rank * p.lora_input
    )


def layer_saved(shape: Shape, p: Precision, length: int) -> float:
    """Bytes per token that autograd keeps for one decoder layer (b = activation bytes, h hidden, i intermediate):

    * LLaMA-like (``rope``, SDPA/flash): 2 RMSNorms keep their fp32 input (2·4h); flash attention keeps q, k, v and
      its output (b·(2·q_dim + 2·kv_dim)) and an fp32 log-sum-exp per head; the MLP keeps the gate output, its SiLU
      and the up output (3·b·i); no s² term.
    * BLOOM (``alibi``, SDPA per packed example with its ALiBi bias): 2 LayerNorms keep their input (2·b·h); the
      fused q, k, v (3·b·h), SDPA's output (b·h) and fp32 log-sum-exp per head; the GELU keeps its input (b·4h);
      no s² term (the bias is shared by the layers: :func:`shared_saved`).
    * plus :func:`lora_saved`. Frozen linear layers keep nothing (no weight gradient).
    """
    b, h = p.activation, shape.hidden
    if shape.family == "alibi":
        own = 2 * b * h + 4 * b * h + FP32 * shape.heads + b * shape.intermediate
    else:
        own = 2 * FP32 * h + b * (2 * shape.q_dim + 2 * shape.kv_dim) + FP32 * shape.heads
        own += 3 * b * shape.intermediate
    return own + lora_saved(shape, p)


def layer_backward_extra(shape: Shape) -> float:
    """Bytes per token a layer's backward holds beyond its saved tensors: the gradients flowing through it, about
    two of the hidden and two of the intermediate width, in fp32 (the adapters' path runs in fp32, so the
    gradients reaching the layer's inputs through it are fp32 too)."""
    return 2 * FP32 * (shape.hidden + shape.intermediate)


def shared_saved(shape: Shape, p: Precision, length: int) -> float:
    """Bytes per token outside the layers: the final norm's fp32 input and output; BLOOM's ALiBi bias with its
    causal mask, heads x n² per example of n tokens (in b; made once per forward, shared by the layers), at most
    heads x ``length`` per token."""
    extra = p.activation * shape.heads * length if shape.family == "alibi" else 0
    return FP32 * shape.hidden + p.activation * shape.hidden + extra


def head_bytes(shape: Shape, p: Precision, batch: Batch) -> tuple[float, float]:
    """(peak of the LM head's backward, logits kept until the micro-batch ends). The head runs on the N response
    positions only (``response_logits``): logits N·V in b, kept for the loss terms; the cross-entropy's fp32
    log-probabilities, their gradient and the logits' fp32 gradient (3·4·N·V) exist at once in its backward."""
    logits = batch.responses * shape.vocab
    return logits * (p.activation + 3 * FP32), logits * p.activation


def activation_bytes(shape: Shape, p: Precision, batch: Batch, checkpointing: bool) -> float:
    """Peak activation bytes of one micro-batch's forward and backward.

    Without checkpointing all layers' saved tensors live until backward; with it, only each layer's input (b·h
    per token, what non-reentrant checkpointing keeps) and, in backward, one layer's recomputed saved tensors.
    The peak is the larger of the head's backward (everything saved + the head peak) and the first layer's
    backward (everything saved + one layer's recompute and gradients + the kept logits)."""
    tokens, length = batch.tokens, batch.length
    layer = layer_saved(shape, p, length) * tokens
    kept = (p.activation * shape.hidden * tokens if checkpointing else layer) * shape.layers
    kept += shared_saved(shape, p, length) * tokens
    head_peak, logits = head_bytes(shape, p, batch)
    working = layer_backward_extra(shape) * tokens + (layer if checkpointing else 0)
    return kept + max(head_peak, working + logits)


# --- per GPU ------------------------------------------------------------------------------------------------
def base_bytes(shape: Shape, p: Precision) -> tuple[float, float, float]:
    """(decoder layers, root, of which quantized) bytes of the frozen base. 4-bit: the layers' linear weights
    in NF4, everything else fp32 (peft's k-bit preparation casts the unquantized weights to fp32)."""
    if not p.four_bit:
        return shape.layer_params * p.weight, shape.root_params * p.weight, 0.0
    quantized = shape.linear_params * NF4_BYTES
    return quantized + (shape.layer_params - shape.linear_params) * FP32, shape.root_params * FP32, quantized


def per_gpu(
    shape: Shape, p: Precision, batch: Batch, layout: Layout, checkpointing: bool
) -> dict[str, float]:
    """Bytes per GPU by item, and their sum as ``peak``.

    DDP: everything whole on each GPU, plus its gradient buckets (a copy of the LoRA gradients). FSDP2 and HSDP
    (``layout.shards`` ranks per weight): base, LoRA weights, gradients and AdamW states divided by the shard
    count, except 4-bit weights (:func:`rega.modules.fsdp.shard_model` leaves them whole on every rank); the root
    unit (embeddings, final norm, head) stays gathered from the forward through the backward (FSDP2 does not
    reshard its root after the forward); two decoder layers are gathered at a time (the running one and the
    prefetched one)."""
    layers, root, quantized = base_bytes(shape, p)
    shards = layout.shards
    lora = FP32 * shape.lora_params
    items = {}
    if layout.name == "ddp":
        items["base weights"] = layers + root
    else:
        items["base weights"] = (layers - quantized) / shards + quantized + root / shards
        items["root unit, gathered"] = root
        one_layer = (layers - quantized + FP32 * shape.lora_layer_params) / shape.layers
        items["all-gather buffers"] = 2 * one_layer
    items["LoRA weights"] = lora / shards
    items["gradients"] = lora / shards
    items["AdamW states"] = 2 * lora / shards
    if layout.name == "ddp":
        items["DDP gradient buckets"] = lora
    items["activations"] = activation_bytes(shape, p, batch, checkpointing)
    items["CUDA context"] = CONTEXT_BYTES
    items["peak"] = sum(items.values())
    return items


def host_bytes_per_node(shape: Shape, p: Precision, layout: Layout) -> float:
    """Host memory at load on the busiest node (:mod:`rega.modules.rank_loading`; 4-bit weights are read in the
    16-bit compute dtype and quantized as they load, so their figure is an upper bound):

    * DDP, and 4-bit under any layout: every rank loads the whole base (``gpus_per_node`` whole bases; the
      safetensors files are memory-mapped and shared, so an upper bound).
    * FSDP2/HSDP: only global rank 0 loads the whole base; the others build it on the meta device and receive
      their shards from rank 0. The node holding rank 0 holds one whole base plus, at most, each of its ranks'
      shard (base / ``shards`` per rank); the other nodes hold only shards.
    """
    whole = shape.base_params * (2 if p.four_bit else p.weight)
    if layout.name == "ddp" or p.four_bit:
        return layout.gpus_per_node * whole
    return whole + layout.gpus_per_node * whole / layout.shards
