"""The REGADataModule: corpus -> chat rendering -> tokenization and label masking -> cached dataset -> batches."""

from rega.datamodules.contract import TrainingData, training_data
from rega.datamodules.rega_datamodule import REGADataModule

__all__ = ["REGADataModule", "TrainingData", "training_data"]
