"""Context (sequence) parallelism: sharding layouts, the ring's process-group plumbing, the strategy."""
