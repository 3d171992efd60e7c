"""A training batch planned on the host, before it moves to the device, so that a step never waits for the GPU.

Reading a value a GPU computed (``.item()``, ``.tolist()``, a boolean mask's count, ``nonzero``) stops the host
until the device has caught up, and the next kernels cannot be queued meanwhile. Everything a step would read
back is known from the collated batch on the host, so it is computed there, once, and travels with the batch:

* the micro-batches (``micro_batch_size`` rows, each cut to its longest row), with stand-ins under FSDP;
* per micro-batch, the positions that predict a response token (``response_index``, into the flattened
  [rows x width] hidden states), their targets and domains, and each domain's share of them
  (``domain_positions``): the LM head, the loss and the loss terms gather with these instead of boolean masks;
* the packed sequences' lengths per row (host ints, for per-sequence attention) and their cumulative offsets
  (``cu_seqlens``, for varlen attention);
* the token counts the step divides by and logs (:func:`rega.datamodules.tokenized.host_counts`).

``REGAModule.transfer_batch_to_device`` plans every batch; a batch that reaches the loss unplanned (tests,
benchmarks) is planned there by :func:`planned`.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from rega.data.chat import IGNORE_INDEX
from rega.datamodules.tokenized import host_counts
from rega.modules.attention import PackedLayout

PLANNED = "response_index"  # present in a planned micro-batch


def plan_batch(batch: dict, micro_batch_size: int | None, min_micro_batches: int = 0) -> dict:
    """``{"micro": [planned micro-batches], "counts": host counts}`` of a collated batch on the host.

    ``min_micro_batches``: pad with stand-ins (one row whose labels are all ignored: they add nothing) up to
    this many; under FSDP every rank must run as many forwards, each gathering weights from all ranks."""
    counts = batch.pop("host", None) or host_counts(batch)
    rows = batch["input_ids"].size(0)
    step = micro_batch_size or rows
    widths = counts["widths"]
    micro = [
        plan_micro({key: value[start : start + step, : max(widths[start : start + step])]
                    for key, value in batch.items()})
        for start in range(0, rows, step)
    ]  # fmt: skip
    if len(micro) < min_micro_batches:
        stand_in = {key: value[:1] for key, value in batch.items()}
        stand_in["labels"] = torch.full_like(stand_in["labels"], IGNORE_INDEX)
        micro += [plan_micro(stand_in)] * (min_micro_batches - len(micro))
    return {"micro": micro, "counts": counts}


def plan_micro(rows: dict[str, torch.Tensor]) -> dict:
    """One micro-batch (host tensors) with its response positions, domains and packed sequences."""
    labels = rows["labels"]
    width = labels.size(1)
    predicts = labels[:, 1:] != IGNORE_INDEX  # position c predicts the token at c + 1
    row, col = predicts.nonzero(as_tuple=True)
    # the domain of the predicted token (a batch made without domains counts as one)
    token_domain = rows.get("token_domain", torch.zeros_like(labels))
    domains = token_domain[:, 1:][predicts]
    layout = PackedLayout.of(rows["position_ids"])  # on the host: its lengths and offsets cost no sync
    return {
        **rows,
        PLANNED: row * width + col,
        "response_targets": labels[:, 1:][predicts],
        "response_domain": domains,
        "domain_positions": {int(d): (domains == d).nonzero().flatten() for d in domains.unique().tolist()},
        "sequence_lengths": layout.lengths(),
        "cu_seqlens": layout.cu_seqlens(),
    }


def planned(batch: dict) -> dict:
    """``batch`` as one planned micro-batch, on its device: as given when it is planned already."""
    if PLANNED in batch:
        return batch
    device = batch["input_ids"].device
    plan = plan_micro({key: value.cpu() for key, value in batch.items() if key != "host"})
    return move_data_to_device(plan, device)
