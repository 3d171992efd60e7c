"""Self-distillation of D_g: batched, restartable, exactly-once, sharded across ranks (HF or vLLM backend)."""

from rega.distill.quality import QualityPolicy
from rega.distill.runner import DistillConfig, run_distillation

__all__ = ["DistillConfig", "QualityPolicy", "run_distillation"]
