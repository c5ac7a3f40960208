"""Dependency-free SVG charts: the training curves (curves.svg) and evaluate.py's sampling bars (results.svg)."""
import math
from xml.sax.saxutils import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]


def nice_ticks(lo, hi, n=5):
    """About n round-numbered ticks covering [lo, hi]."""
    if hi - lo < 1e-12 * max(abs(lo), abs(hi), 1):
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / n
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 2.5, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.floor(lo / step) * step
    return [first + k * step for k in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def svg_panel(x0, y0, w, h, title, xs, series, xlabel=None, bars=False, dots=(), ylim=None):
    """One chart at (x0, y0): axes with ticks and labels, then `series` [(label, ys)] as lines, or as grouped
    bars over categorical xs, and `dots` [(series index, x, y)] as points in that series' colour (the runs a line
    averages). `ylim` (lo, hi) fixes the y axis, e.g. (0, 100) for a percentage, so that 1% does not fill the panel.
    Each line/bar/dot carries its raw values in data- attributes."""
    values = [v for _, ys in series for v in ys if v is not None and math.isfinite(v)] + [d[2] for d in dots] or [0.0]
    top = max(values)
    yt = (nice_ticks(*ylim) if ylim else nice_ticks(0.0, top if top > 0 else 1.0) if bars  # bars rise from 0
          else nice_ticks(min(values), top))
    levels = not bars and xs and all(isinstance(x, int) for x in xs) and max(xs) - min(xs) <= 12  # a tick a level
    xt = (list(range(len(xs) + 1)) if bars else  # bars: category i spans [i, i+1]
          list(range(min(xs), max(xs) + 1)) if levels else nice_ticks(min(xs), max(xs), 4))
    pad = 0.25 if levels else 0.0  # keeps the end levels' dots off the frame
    px = lambda x: x0 + 52 + (x - xt[0] + pad) / ((xt[-1] - xt[0] + 2 * pad) or 1) * (w - 64)  # noqa: E731
    py = lambda y: y0 + h - 34 - (y - yt[0]) / ((yt[-1] - yt[0]) or 1) * (h - 58)  # noqa: E731
    out = [f'<text x="{x0 + 52}" y="{y0 + 16}" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{x0 + 52}" y="{y0 + 24}" width="{w - 64}" height="{h - 58}" fill="none" stroke="#999"/>']
    for t in yt:
        out.append(f'<line x1="{x0 + 48}" x2="{x0 + w - 12}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{x0 + 46}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    for i, t in enumerate(xt[:len(xs)] if bars else xt):
        label = escape(str(xs[i])) if bars else f"{t:.4g}"
        out.append(f'<text x="{px(t + (0.5 if bars else 0)):.1f}" y="{y0 + h - 18}" text-anchor="middle">{label}</text>')
    if xlabel:
        out.append(f'<text x="{x0 + w / 2 + 20}" y="{y0 + h - 2}" text-anchor="middle">{xlabel}</text>')
    for k, (label, ys) in enumerate(series):
        color, attrs = COLORS[k % len(COLORS)], f'data-label="{label}" data-y="{",".join(repr(v) for v in ys)}"'
        if bars:
            width = 0.8 / len(series)
            out += [f'<rect x="{px(i + 0.1 + k * width):.1f}" y="{py(v):.1f}" width="{px(width) - px(0):.1f}" '
                    f'height="{py(yt[0]) - py(v):.1f}" fill="{color}" data-label="{label}" data-value="{v!r}"/>'
                    for i, v in enumerate(ys)]
        else:
            points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if y is not None and math.isfinite(y))
            out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5" {attrs} '
                       f'data-x="{",".join(repr(x) for x in xs)}"/>')
        if len(series) > 1:  # the legend: one line per series, right of the title row, out of the plot
            out.append(f'<text x="{x0 + w - 12}" y="{y0 + 8 + 8 * k}" text-anchor="end" font-size="8" '
                       f'fill="{color}">{escape(label)}</text>')
    for k, x, y in dots:  # nudged sideways by series, so equal values stay visible
        out.append(f'<circle cx="{px(x) + 4 * (k - 1):.1f}" cy="{py(y):.1f}" r="2.5" fill="{COLORS[k % len(COLORS)]}" '
                   f'fill-opacity="0.6" data-label="{series[k][0]}" data-x="{x!r}" data-y="{y!r}"/>')
    return out


def svg_page(panels, title, w, h, cols):
    """A page of panels, `cols` to a row, each panel (title, xs, series, xlabel, bars[, dots[, ylim]]) for svg_panel."""
    rows = math.ceil(len(panels) / cols)
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * cols}" height="{h * rows + 30}" '
            f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>',
            f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, panel in enumerate(panels):
        body += svg_panel(w * (i % cols), 30 + h * (i // cols), w, h, *panel)
    return "\n".join(body + ["</svg>"]) + "\n"


def svg_lines(rows, panels, title):
    """Line charts of metric rows against their step: one panel per (title, [keys])."""
    xs = [r["step"] for r in rows]
    charts = [(name, xs, [(k, [r.get(k) for r in rows]) for k in keys], "step") for name, keys in panels]
    return svg_page(charts, title, 320, 210, 4 if len(charts) > 6 else 3)
