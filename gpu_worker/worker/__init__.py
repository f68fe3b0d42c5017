"""The model runner and its collaborators: input batch, sampler, KV sizing."""
