"""The pretraining text pipeline: `sources` (where documents come from), `examples` (NSP pairs and
masking), `pipeline` (deterministic per-host batches with a checkpointable state)."""
