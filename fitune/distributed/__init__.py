"""Training on several processes: FSDP2 (``torch.distributed.fsdp.fully_shard``) launched by torchrun.

``world`` says which process this is and holds the few collectives the run needs; ``shard`` lays FSDP2 over
a session's model, for training and planning alike; ``launch`` starts the processes.
"""
