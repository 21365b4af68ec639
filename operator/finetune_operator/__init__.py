"""finetune-operator: a Kopf operator that runs FinetuneJobs as GPU training Jobs."""
