"""The train stage: the base model loaded, the LoRA recipe (setup, step, save), its batches,
checkpoints, caches and data-parallel launch."""
