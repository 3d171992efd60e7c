"""HSDP (FSDP2 sharded within a node, replicated across nodes) without a GPU: 4 gloo processes as 2 simulated nodes
of 2, each node started as one runs it on its own machine (``cli.py fit`` with ``NODE_RANK``), against DDP over
the same 4 ranks; and the shard size's layout arithmetic and refusal."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
from cluster_helpers import assert_trains_like_ddp, fit_args, free_port, run_env

from rega.errors import ConfigError
from rega.modules.fsdp import FSDP2Strategy

REPO = Path(__file__).resolve().parent.parent
NODES = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "2"]
HSDP = ["--config", str(REPO / "configs/trainer/hsdp.yaml"), *NODES]
DDP = ["--config", str(REPO / "configs/trainer/ddp_cpu.yaml"), *NODES]  # DDP over the same 4 ranks
COMMON = [
    "--trainer.limit_val_batches", "0", "--trainer.max_steps", "3", "--model.max_grad_norm", "0.05",
    "--config", str(REPO / "tests/configs/step_checkpoints.yaml"),
    "--model.micro_batch_size", "2",  # gradients accumulate unsynced (both mesh dimensions) until the last
]  # fmt: skip


def fit_on_two_nodes(args: list[str], logs: Path, timeout: float = 300) -> list[int]:
    """``args`` started once per simulated node, as on each machine of a 2-node job: ``NODE_RANK`` tells the
    launcher its node and Lightning starts the node's second process (output in ``logs/node{n}.log``)."""
    logs.mkdir(parents=True, exist_ok=True)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = []
    for node in range(2):
        with open(logs / f"node{node}.log", "wb") as out:
            env = {**run_env(), **rendezvous, "NODE_RANK": str(node)}
            procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        return [proc.wait(max(0.1, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_hsdp_on_two_nodes_trains_like_ddp_on_a_2d_mesh(tiny_model_dir, tmp_path):
    """2 nodes x 2 processes: each LoRA weight sharded over its node's 2 ranks and replicated across the nodes,
    every rank reading its own batches; per-step loss and clipped global gradient norm equal DDP's over the same
    4 ranks, and the checkpoint holds every LoRA tensor whole."""
    cache = tmp_path / "cache"  # both simulated nodes write it at once, as on a shared disk (atomic writes)
    ddp, hsdp, reports = tmp_path / "ddp", tmp_path / "hsdp", tmp_path / "mesh"
    # after COMMON, whose step_checkpoints.yaml sets the callback list
    report = ["--trainer.callbacks+=cluster_helpers.MeshReport", f"--trainer.callbacks.folder={reports}"]
    for root, extra in [(ddp, DDP), (hsdp, [*HSDP, *report])]:
        codes = fit_on_two_nodes(fit_args(tiny_model_dir, root, *COMMON, *extra, cache=cache), root / "logs")
        node_logs = [(root / "logs" / f"node{n}.log").read_text() for n in range(2)]
        assert codes == [0, 0], node_logs[0][-4000:] + node_logs[1][-4000:]

    in_node = json.dumps([["replicate", "shard"], [[0, 1], [2, 3]]])  # node 0 holds ranks 0 and 1
    for rank in range(4):
        seen = json.loads((reports / f"rank{rank}.json").read_text())
        assert seen["meshes"] == [in_node], rank
        assert seen["placements"] == ["(Replicate(), Shard(dim=0))"] and seen["params"] > 0, rank
        assert seen["sampler"] == {"num_replicas": 4, "rank": rank}
    hsdp_log = (hsdp / "logs" / "node0.log").read_text()
    assert "FSDP2: 2 LlamaDecoderLayer units, sharded over 2 ranks × replicated 2×" in hsdp_log

    assert_trains_like_ddp(ddp, hsdp, steps=3)


@pytest.mark.parametrize(
    ("shard_size", "shape"), [("all", (1, 8)), ("node", (2, 4)), (2, (4, 2)), (8, (1, 8)), (1, (8, 1))]
)
def test_shard_size_gives_the_mesh_shape(shard_size, shape):
    """2 nodes x 4 processes: (replicas, ranks per shard); one replica means today's flat FSDP2 mesh."""
    trainer = L.Trainer(
        accelerator="cpu", devices=4, num_nodes=2, strategy=FSDP2Strategy(shard_size=shard_size), logger=False
    )
    assert trainer.strategy.mesh_shape() == shape


def test_a_shard_size_that_does_not_divide_the_world_is_refused_when_the_trainer_is_built():
    with pytest.raises(
        ConfigError, match=r"shard_size=3 does not divide the world size 4 \(2 nodes x 2 proc"
    ):
        L.Trainer(
            accelerator="cpu", devices=2, num_nodes=2, strategy=FSDP2Strategy(shard_size=3), logger=False
        )
    with pytest.raises(ConfigError, match="'all', 'node' or a positive integer, got 'nodes'"):
        FSDP2Strategy(shard_size="nodes")
