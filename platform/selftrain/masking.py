"""Credentials never leave the process in clear: URIs such as `s3://KEY:SECRET@bucket/pool`,
`postgresql://user:pass@host/db` or `https://host/x?token=...` are masked wherever a value is
printed, logged to MLflow, or written to `state.json` / `summary.json`."""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(?P<head>[A-Za-z][\w+.-]*:/{1,3}[^:/@\s]*):[^@\s]*@")
_SECRET_QUERY = re.compile(r"(?P<head>[?&](?:[\w.]*-)?(?:password|passwd|pwd|token|access_token|secret|"
                          r"client_secret|api_key|apikey|sig|signature)=)[^&\s]*", re.I)


def redact(text: str) -> str:
    """Mask passwords in URIs (`scheme://user:pass@host`) and secret query parameters, anywhere
    in `text` (MLflow's and fsspec's own errors quote the full URI)."""
    text = _USERINFO.sub(r"\g<head>:***@", text)
    return _SECRET_QUERY.sub(r"\g<head>***", text)


def redact_tree(value: Any) -> Any:
    """`redact` applied to every string in nested dicts and lists (a config dump, a summary)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return value
