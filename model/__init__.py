"""The supervised workload: GPT model, data mixture and sampler, training loop."""
