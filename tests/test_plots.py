"""Loss and norm plots (both hosts draw them with e4t.line_plot): a single step or a constant series is
drawn in the middle of a real range, never against a collapsed axis."""
import torch

from e4t import line_plot
from e4t.plots import _span

BLUE = torch.tensor([30, 90, 200]) / 255


def marks(img):
    """(row, column) centre of the drawn points and line."""
    hit = ((img - BLUE).abs().sum(-1) < 0.02).nonzero().float()
    return hit.mean(0)


def test_one_step_is_drawn_in_the_middle_of_the_axes():
    img = line_plot([1], [0.9953], "E4T tuning loss", "step", "loss")
    h, w = img.shape[:2]
    row, col = marks(img)
    assert abs(col - (64 + (w - 16 - 64) / 2)) < 2 and abs(row - (28 + (h - 40 - 28) / 2)) < 2


def test_constant_and_zero_series_get_a_range_around_the_value():
    assert _span(0.5, 0.5) == (0.45, 0.55)
    assert _span(0.0, 0.0) == (-1.0, 1.0)
    assert _span(-2.0, -2.0) == (-2.2, -1.8)
    assert _span(1.0, 3.0) == (1.0, 3.0)
    img = line_plot([1, 2, 3], [0.2, 0.2, 0.2], "t", "x", "y")
    row, _ = marks(img)
    assert abs(row - (28 + (img.shape[0] - 40 - 28) / 2)) < 2
