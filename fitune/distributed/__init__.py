"""Training on several processes: FSDP2 (``torch.distributed.fsdp.fully_shard``) launched by torchrun.

``world`` says which process this is and holds the few collectives the run needs; ``shard`` lays FSDP2 over
a session's model (the session builder calls it); ``save`` gathers the result to rank 0; ``launch`` starts
the processes.
"""
