"""The generic trainer: configs, the epoch cycler and ``CoreTrainer``."""
