"""scripts/gpu_check.py --dry-run: the one-command GPU check runs end to end on CPU (tiny fp32 shapes) and
writes the JSON the GPU run will write, so the real run does not fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKED = ["packed_llama_fp32", "packed_llama_bf16", "packed_bloom_fp32", "packed_bloom_bf16"]
CHECKS = ["environment", *PACKED, "packed_llama_4bit", "exact_resume", "attention", "train_1_layers", "train_2_layers", "extrapolation", "train_bf16_true",
          "generation", "qlora", "fsdp2"]  # fmt: skip


def test_dry_run_writes_every_check(tmp_path):
    output = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--dry-run", "--output", str(output)],
        cwd=REPO, capture_output=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    report = json.loads(output.read_text())
    assert set(CHECKS) <= report.keys() and report["meta"]["dry_run"] is True
    # On CPU only QLoRA is skipped (and varlen absent); every other check, FSDP2 on one rank included, runs.
    failed = {name: report[name]["error"] for name in CHECKS if "error" in report[name]}
    assert not failed
    assert report["qlora"]["skipped"] == "QLoRA needs CUDA"
    assert report["packed_llama_4bit"]["skipped"] == "4-bit needs CUDA"
    for name in PACKED:  # fp32 on CPU: the examples equal themselves alone, and a leak would stand far above
        assert (
            report[name]["ok"] and report[name]["leak_visible"] and report[name]["max_rel_grad_error"] < 1e-4
        )
    resume = report["exact_resume"]
    assert resume["ok"] and resume["bitwise_equal"] and sorted(resume["losses_resumed"]) == ["4", "5", "6"]
    assert {"val/loss_medical", "val/loss_legal"} <= resume["val_losses"].keys()
    assert {"torch", "transformers", "peft", "lightning"} <= report["environment"]["versions"].keys()

    for case in ("mha_llama7b", "gqa"):
        paths = report["attention"][case]["paths"]
        assert {"per_sequence", "masked_sdpa"} <= paths.keys()  # varlen needs CUDA
        for path in paths.values():
            assert path["fwd_bwd_ms_per_layer"] > 0
            assert max(path["max_rel_error_vs_fp32"].values()) < 1e-4  # fp32 on CPU: the same numbers
    assert report["attention"]["gqa"]["shape"]["kv_heads"] < report["attention"]["gqa"]["shape"]["heads"]

    for name in ("train_1_layers", "train_2_layers", "train_bf16_true"):
        run = report[name]
        assert run["tokens_per_s"] > 0 and run["model_tflops_per_s"] > 0 and run["steps_timed"] > 0
        assert run["attention_calls"]["per_sequence"] > 0 and run["attention_calls"]["varlen"] == 0
        assert run["lora_dtype"] and run["loss_dtype"] and run["loss"] > 0
    assert report["train_bf16_true"]["lora_dtype"] == "torch.float32"  # rega.modules.precision
    assert report["train_bf16_true"]["base_weight_dtype"] == "torch.bfloat16"
    assert report["train_1_layers"]["lora_dtype"] == "torch.float32"
    assert report["fsdp2"]["strategy"] == "FSDP2Strategy" and report["fsdp2"]["fsdp2_sharded"]
    assert report["extrapolation"]["to_layers"] == 32 and report["extrapolation"]["step_seconds"] > 0
    assert report["generation"]["new_tokens"] > 0
