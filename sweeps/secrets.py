"""Keep credentials out of every file a sweep writes.

A database URL given to ``--optuna-storage`` may carry a password (``postgresql://u:pw@host/db``).
The sweep writes its options to ``state.json``, and Ray Tune pickles the Optuna searcher, study and
storage into the experiment folder (``tuner.pkl``, ``searcher-state-*.pkl``) so it can restore them.
:func:`redact_url` is what is written instead, and :class:`RedactedRDBStorage` pickles only the
redacted URL; the live process keeps the full one in memory, given again on ``--resume``.
"""
from __future__ import annotations

from typing import Any

from optuna.storages import RDBStorage

MASK = "REDACTED"
_SECRET_WORDS = ("password", "passwd", "pwd", "secret", "token", "api_key", "apikey")
#: Redacted URL -> full URL, for storages of this process (restored pickles find their password here).
_FULL_URLS: dict[str, str] = {}


def redact_url(url: str) -> str:
    """``url`` with its password and any secret-looking query value replaced by ``REDACTED``.

    A string SQLAlchemy cannot parse is returned whole only if it has no ``@`` or ``=`` (where a
    secret could hide); otherwise it is masked entirely.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return url if "@" not in url and "=" not in url else MASK
    if parsed.password is not None:
        parsed = parsed.set(password=MASK)
    query = {k: (MASK if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in parsed.query.items()}
    return parsed.set(query=query).render_as_string(hide_password=False)


class RedactedRDBStorage(RDBStorage):
    """Optuna's SQLAlchemy storage, pickled with its URL redacted (Tune pickles searchers to disk)."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        _FULL_URLS[redact_url(url)] = url

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = redact_url(state["url"])
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        # A restored sweep re-creates its storage from --optuna-storage first, which registers it.
        state = {**state, "url": _FULL_URLS.get(state["url"], state["url"])}
        super().__setstate__(state)
