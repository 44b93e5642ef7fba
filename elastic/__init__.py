"""elasticd: fault-tolerance mechanisms, each usable on its own (rendezvous, checkpoint, guard)."""
