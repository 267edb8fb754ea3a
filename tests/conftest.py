import torch

# One intra-op thread: on a small shared machine, several threads per test process oversubscribe
# the cores and slow tiny models down by orders of magnitude.
torch.set_num_threads(1)
