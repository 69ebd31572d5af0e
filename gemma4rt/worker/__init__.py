"""worker: one per GPU rank. Owns weights, KV tensors and CUDA graphs; receives a StepPlan, runs the
forward pass and sampling, emits a StepResult."""
