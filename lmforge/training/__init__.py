"""What training needs besides its stage: the model and its loss, the token windows, checkpoints,
and the one throughput (MFU) measurement."""
