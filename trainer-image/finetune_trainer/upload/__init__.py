"""The upload stage: every artifact to the run's S3 prefix, then manifest.json listing them."""
