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


def per_step(run) -> tuple:
    """(operations, kernels) one more step adds: `run(steps)` dispatches for 2 steps less for 1 (setup cancels)."""
    counted = []
    for steps in (1, 2):
        with Dispatched() as counter:
            run(steps)
        counted.append((counter.ops, counter.kernels))
    return counted[1][0] - counted[0][0], counted[1][1] - counted[0][1]
