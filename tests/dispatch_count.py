"""Counting what a block of code dispatches below autograd: every aten operation, and those that are not views
(about one GPU kernel launch each), so tests can check launch-bound work without a GPU."""
from torch.utils._python_dispatch import TorchDispatchMode


class Dispatched(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))
