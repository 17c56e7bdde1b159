"""Keep broker and store credentials out of everything a worker prints or logs.

Celery prints the broker URL in its start-up banner and in connection messages, with the password
masked but the user shown (`redis://portq:**@host`); portq shows neither. Every log handler's
formatter is wrapped, so messages and tracebacks are redacted alike, in the main process and in the
pool children it forks. The object store's secret key and session token (AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN) are replaced wherever they would appear, too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from portq.tasks.core.settings import redact_url

#: a password shorter than this is not replaced where it appears on its own (it would mangle ordinary words)
MIN_BARE_SECRET = 6


#: environment variables whose values are credentials of the object store (botocore reads them)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def environment_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """The object-store credentials in the environment, to be kept out of logs like the broker's password."""
    env = os.environ if env is None else env
    return [env[name] for name in SECRET_ENV if env.get(name)]


class Redactor:
    def __init__(self, url: str | None, *, secrets: list[str] | None = None, store: str | None = None):
        self.replacements: list[tuple[str, str]] = []
        for value in [*(secrets or []), *_url_secrets(store)]:
            if len(value) >= MIN_BARE_SECRET:
                self.replacements.append((value, "***"))
        if not url:
            return
        shown = redact_url(url)
        forms = {url, _kombu_uri(url)}
        for form in sorted((f for f in forms if f and f != shown), key=len, reverse=True):
            self.replacements.append((form, shown))
        parts = urlsplit(url)
        for secret in (parts.password, unquote(parts.password or "")):
            if secret and len(secret) >= MIN_BARE_SECRET:
                self.replacements.append((secret, "***"))

    def __call__(self, text: str) -> str:
        for secret, shown in self.replacements:
            text = text.replace(secret, shown)
        return text


class RedactingFormatter(logging.Formatter):
    """Formats with the handler's own formatter, then redacts the result (message and traceback)."""

    def __init__(self, inner: logging.Formatter | None, redactor: Redactor):
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(self.inner.format(record))


def install(redactor: Redactor) -> None:
    """Wrap the formatter of every handler on the root logger and on Celery's loggers."""
    if not redactor.replacements:
        return
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("celery", "celery.task", "celery.redirected"))]
    for logger in loggers:
        for handler in logger.handlers:
            if not isinstance(handler.formatter, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(handler.formatter, redactor))


def _url_secrets(url: str | None) -> list[str]:
    if not url or "://" not in url:
        return []
    parts = urlsplit(url)
    return [s for s in {parts.password, unquote(parts.password or "")} if s]


def _kombu_uri(url: str) -> str:
    try:
        from kombu import Connection

        return str(Connection(url).as_uri())
    except Exception:  # an odd URL: the raw forms are still replaced
        return ""
