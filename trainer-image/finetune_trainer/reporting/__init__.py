"""What every stage reports through: progress and metrics into the FinetuneJob status, the
training log and the loss plot."""
