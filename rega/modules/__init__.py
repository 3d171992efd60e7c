"""Model loading, the LoRA LightningModule, and batched generation."""
