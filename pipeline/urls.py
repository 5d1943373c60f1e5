"""Server URLs without their credentials, for everything that shows or stores one.

`--base-url http://user:sk-...@host/v1?api_key=...` (or the same in `OPENAI_BASE_URL`) works as
given, but error lines, the resolved `*.config.json`, log records and the request cache's key
see `http://[redacted]@host/v1?api_key=[redacted]`. Used by `config.to_dict` (every stored
string) and by `backends` (messages, logs, cache keys).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

REDACTED = "[redacted]"
# Query parameters whose value is a credential: any name containing one of these words
# (api_key, access_token, X-Amz-Signature, sig, password, client_secret, auth, ...).
SECRET_PARAM_WORDS = ("key", "token", "secret", "password", "passwd", "sig", "auth", "credential")
# A URL inside free text: a scheme, then everything up to whitespace or a quote, less the
# punctuation that ends a sentence around it ("cannot connect to URL: refused").
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*[^\s\"'<>.,:;)\]]")
# Greedy to the last "@" before the path: a password may hold a raw "@".
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _is_secret_param(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_PARAM_WORDS)


def redact_url(url: str) -> str:
    """`url` with its userinfo and the values of key-like query parameters replaced by [redacted]."""
    url = _USERINFO.sub(rf"\1{REDACTED}@", url)
    if "?" not in url:
        return url
    head, _, rest = url.partition("?")
    query, hash_mark, fragment = rest.partition("#")
    parts = []
    for piece in query.split("&"):
        name, equals, value = piece.partition("=")
        parts.append(f"{name}={REDACTED}" if equals and value and _is_secret_param(name) else piece)
    return f"{head}?{'&'.join(parts)}{hash_mark}{fragment}"


def redact_urls(text: str) -> str:
    """`text` with every URL in it redacted (error messages, log lines, config values)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def url_secrets(url: str | None) -> list[str]:
    """The credential strings inside `url` (password, user, key-like query values), for log scrubbing."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        found = [parts.password, parts.username]
        found += [value for name, value in parse_qsl(parts.query) if _is_secret_param(name)]
        # The raw (still %-encoded) values too: that is how a logged URL shows them.
        found += [piece.partition("=")[2] for piece in parts.query.split("&") if _is_secret_param(piece.partition("=")[0])]
    except ValueError:  # an unparseable port or the like: the SDK will refuse it anyway
        return []
    return [s for s in found if s]
