"""Training machinery shared by every task: the loop, optimiser and schedule, losses, precision, torchrun/DDP, checkpoints."""
