"""The HTML of a report page: one self-contained file (CSS inline, figures as base64 PNG, no
script, nothing fetched), so it can be attached to a ticket or a mail and opened anywhere.

Numbers that a reader (or a test) may want to check carry their exact value in a `data-value`
attribute beside the rounded text, and what they are in `data-metric` / `data-key`.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from string import Template
from typing import Any

from selftrain import plots

# The Content-Security-Policy makes the promise checkable: a browser opening the page loads
# nothing but the page itself (images may only be data: URIs, styles only the inline sheet).
PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="generator" content="selftrain $version">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330; margin: 0 auto;
       max-width: 1100px; padding: 1.5rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; border-bottom: 1px solid #d5dae3;
     padding-bottom: .2rem; margin-top: 2rem; } h3 { font-size: 1rem; margin-bottom: .3rem; }
.meta { color: #5b6475; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums;
        display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #d5dae3; padding: .2rem .55rem; text-align: right; }
th { background: #f1f3f7; text-align: left; } td.text { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
img { max-width: 100%; height: auto; border: 1px solid #eceff4; }
.figures > img, .figures > div { max-width: calc(50% - .5rem); }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: 12px; }
.notice { background: #fff6e0; border-left: 4px solid #e0a100; padding: .5rem .8rem; margin: 1rem 0; }
.notice.ok { background: #eaf7ee; border-color: #2e9d50; }
code { font-size: 12px; }
</style>
</head>
<body>
<h1>$title</h1>
<p class="meta">$meta</p>
$body
</body>
</html>
""")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, meta: str, body: str) -> str:
    from selftrain import __version__

    return PAGE.substitute(title=esc(title), meta=meta, body=body, version=esc(__version__))


def attrs(data: dict[str, Any]) -> str:
    """` data-k="v"` for each item (underscores become dashes); None values are left out."""
    return "".join(f' data-{k.replace("_", "-")}="{esc(v)}"' for k, v in data.items() if v is not None)


def number(value: Any, digits: int = 4) -> str:
    """The text of a number: floats rounded, None and NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def cell(value: Any, digits: int = 4, **data: Any) -> str:
    """A numeric cell: rounded text, the exact value in `data-value` (with `data` attributes)."""
    exact = None if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)
    return f"<td{attrs({**data, 'value': exact})}>{esc(number(value, digits))}</td>"


def text_cell(value: Any, **data: Any) -> str:
    return f'<td class="text"{attrs(data)}>{esc(number(value))}</td>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], **data: Any) -> str:
    """`rows` of ready cells (`cell`, `text_cell`)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(f"<tr>{''.join(row)}</tr>" for row in rows)
    return f"<table{attrs(data)}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(fig: Any, alt: str, **data: Any) -> str:
    """A matplotlib figure as an inline PNG; the figure is released."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    finally:
        plots.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}"{attrs(data)}>'


def section(title: str, body: str, id: str) -> str:
    return f'<section id="{esc(id)}"><h2>{esc(title)}</h2>\n{body}\n</section>'


def notice(lines: Sequence[str], ok: bool = False, **data: Any) -> str:
    """A highlighted box; each line already HTML (escape what comes from the run)."""
    items = "".join(f"<li>{line}</li>" for line in lines)
    return f'<div class="notice{" ok" if ok else ""}"{attrs(data)}><ul>{items}</ul></div>'


def pre(text: str, **data: Any) -> str:
    return f"<pre{attrs(data)}>{esc(text)}</pre>"
