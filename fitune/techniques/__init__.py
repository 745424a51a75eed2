"""What a session installs on a model: lean activations, attention kernels, activation offload, the fused
loss, optimizers, hub-kernel control and the check that every patch is still in place."""
