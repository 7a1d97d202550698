"""Small line plots as images (tuning loss per step; ‖w − e_domain‖ over sampling timesteps, paper fig. 7).

Drawn with Pillow, which both hosts ship, so no plotting library is needed.
"""
import torch


def _span(lo: float, hi: float):
    """The axis range; one value (a 1-step tune, a constant loss) is centred in a range around it."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _axes(xs, ys, title, xlabel, ylabel, size, connect):
    from PIL import Image, ImageDraw

    w, h = size
    left, right, top, bottom = 64, 16, 28, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), title, fill="black")
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if xs:
        x0, x1 = _span(min(xs), max(xs))
        y0, y1 = _span(min(ys), max(ys))
        px = lambda x: left + (x - x0) / (x1 - x0) * (w - right - left)
        py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - bottom - top)
        points = [(px(x), py(y)) for x, y in zip(xs, ys)]
        if connect and len(points) > 1:
            draw.line(points, fill=(30, 90, 200), width=2)
        for p in points:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(30, 90, 200))
        draw.text((4, top), f"{y1:.4g}", fill="black")
        draw.text((4, h - bottom - 10), f"{y0:.4g}", fill="black")
        draw.text((left, h - bottom + 4), f"{x0:.4g}", fill="black")
        draw.text((w - right - 40, h - bottom + 4), f"{x1:.4g}", fill="black")
    draw.text((w // 2 - 30, h - 18), xlabel, fill="black")
    draw.text((4, h // 2), ylabel, fill="black")
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).float() / 255


def line_plot(xs, ys, title: str, xlabel: str, ylabel: str, size=(512, 320)) -> torch.Tensor:
    """-> (h, w, 3) float image in [0, 1] (ComfyUI's IMAGE layout without the batch axis)."""
    return _axes(xs, ys, title, xlabel, ylabel, size, connect=True)


def scatter_plot(xs, ys, title: str, xlabel: str, ylabel: str, size=(512, 400)) -> torch.Tensor:
    return _axes(xs, ys, title, xlabel, ylabel, size, connect=False)
