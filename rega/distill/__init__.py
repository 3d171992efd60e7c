"""Self-distillation of D_g: batched, restartable, exactly-once, sharded across ranks (HF or vLLM backend).

Its settings, :class:`rega.config.DistillConfig`, live on the ground floor: the data module reads them too."""

from rega.distill.runner import run_distillation

__all__ = ["run_distillation"]
