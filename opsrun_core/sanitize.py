"""Make free text safe to store and show: secrets redacted, one line, bounded length.

:func:`sanitize_message` is what every failure message and error string goes through before it
reaches the ledger or a log line. It never raises, whatever it is given, and sanitizing its output
again changes nothing.

The steps, in order:

1. turn the input into text (``str()``, bytes decoded as UTF-8 with replacement; an object whose
   ``str()`` fails becomes ``<unprintable TypeName>``); lone surrogates become U+FFFD;
2. fold: control characters (C0, DEL, C1), line and paragraph separators and all whitespace become
   single spaces; invisible format characters (zero-width spaces and joiners, bidi controls, BOM)
   are removed, so they can neither hide a secret from the patterns nor reorder the text shown;
3. redact: replace every secret found by the patterns below with ``[REDACTED]``, keeping the
   name of a ``key=value`` pair, the scheme of ``Bearer``/``Basic`` and the user and host of a URL;
4. cut to ``max_length``, marking the cut with ``…``.

Folding comes before redacting, so a header value never "runs to the end of the line": every
pattern sees one line, exactly as a second pass would. Steps 2-3 repeat until nothing changes
(normally once more, to check), and a cut is moved back a character at a time until the cut text
is itself left unchanged (a cut must not leave, say, ``token=[RED…`` that a second pass would
redact again), which is what makes sanitizing idempotent.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Final, SupportsIndex

from opsrun_core.fingerprint import is_secret_key, normalize_key_name

__all__ = ["DEFAULT_MAX_LENGTH", "REDACTED", "sanitize_message"]

#: What each secret is replaced with.
REDACTED: Final = "[REDACTED]"

#: Default longest result, in characters, ``…`` included.
DEFAULT_MAX_LENGTH: Final = 500

_ELLIPSIS: Final = "…"

#: Input beyond this many characters (or 8 x ``max_length``, when larger) is dropped, at a word
#: boundary, before any pattern runs, so that a huge response body dumped into an exception costs
#: bounded time. The part dropped could never reach the result anyway.
_MIN_INPUT_LIMIT: Final = 64 * 1024

#: Redaction passes before giving up on reaching a fixed point (never seen: one pass is enough,
#: the second confirms). Giving up yields a bare ``[REDACTED]``.
_MAX_PASSES: Final = 4

# --- Folding ----------------------------------------------------------------------------------

#: C0 controls, DEL, C1 controls, Unicode line and paragraph separators: each becomes a space.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: Invisible format characters: soft hyphen, Arabic letter mark, Mongolian vowel separator,
#: zero-width space/joiners and LTR/RTL marks, bidi embeddings/overrides/isolates, word joiner and
#: invisible operators, BOM, interlinear annotation marks. Removed.
_INVISIBLE = re.compile(
    "[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE = re.compile(r"\s+")

# --- Secret patterns --------------------------------------------------------------------------
#
# Every secret pattern lives here, compiled once. They run in the order of _REDACTIONS (after the
# key/value scan) on folded, one-line text. Each is written so that neither its replacement nor
# REDACTED itself matches again: "[" and "]" are outside every token alphabet below, and a value
# that is already REDACTED is replaced by REDACTED.

#: A PEM private key block (RSA, EC, OPENSSH, ENCRYPTED, PGP ... PRIVATE KEY), BEGIN to END; a
#: block without its END (the message was cut) is redacted to the end of the text.
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    r".*?(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.DOTALL,
)

#: The password of a URL's userinfo: ``scheme://user:password@host`` keeps user and host. The
#: password runs to the last ``@`` before the path (an unescaped ``@`` in it is common in DSNs).
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]{0,31}://[^\s:/?#@\[\]]*:)"  # scheme://user:
    r"(?P<password>[^\s/?#]{1,1024})(?=@)"
)

#: The name and separator of a ``key=value`` / ``key: value`` / ``"key": value`` / ``'key': value``
#: / ``key => value`` pair. Whether it is a secret is decided by
#: :func:`opsrun_core.fingerprint.is_secret_key` on the name, so the list lives in one place.
_KEY_AND_SEPARATOR = re.compile(
    r"""(?<![\w.\-])
    (?: "(?P<dq>[^"]{1,100})" | '(?P<sq>[^']{1,100})' | (?P<bare>[\w.\-]+) )
    \s*(?:=>|:=|[:=])\s*""",
    re.VERBOSE,
)

# Values of a secret pair. Quoted values keep their quotes around REDACTED; an unterminated
# quote (a cut message) runs to the end of the text.
_QUOTED_VALUE = r"""
    \\"(?:[^"\\]|\\[^"])*(?:\\")?       # a JSON-escaped string inside a string: \"...\"
  | "(?:[^"\\]|\\.)*"?                 # "double quoted"
  | '(?:[^'\\]|\\.)*'?                 # 'single quoted'
"""

#: The value of a secret ``key=value`` pair.
_SECRET_VALUE = re.compile(
    _QUOTED_VALUE
    + r"""
  | \[REDACTED\]                       # already redacted (user:[REDACTED]@host keeps the host)
  | \[[^\[\]]*\](?=[\s,;&)}\]…]|\Z)    # [a list]
  | \{[^{}]*\}(?=[\s,;&)}\]…]|\Z)      # {a flat object}
  | (?:(?:bearer|basic|digest|token|negotiate|ntlm)\s+)?  # an optional auth scheme, then a bare
    (?:[^\s,;&"']                                          # value: up to a space, or up to
      | [,;&](?!\s|\Z|["']|[^\s=:,;&"']{1,64}\s*[=:])     # a , ; & before a space/quote/key=,
      | ["'](?!\s|\Z|[,;&)\]}:])                         # or a closing quote ('token=abc')
    )+
""",
    re.VERBOSE | re.IGNORECASE,
)

#: The value of an ``Authorization`` / ``Proxy-Authorization`` / ``Cookie`` / ``Set-Cookie``
#: header: the whole of it, i.e. an optional scheme, a credential, then any ``, name=value`` or
#: ``; name=value`` parameters (Digest, AWS SigV4, several cookies).
_HEADER_VALUE = re.compile(
    _QUOTED_VALUE
    + r"""
  | (?:[A-Za-z][\w.+-]*\s+)?                                 # scheme: Bearer, Digest, ...
    (?:"[^"]*"?|[^\s,;"']|'(?!\s|\Z|[,;)\]}]))+              # credential
    (?:\s*[,;]\s*[\w.~+/-]+=(?:"[^"]*"?|[^\s,;"])+)*         # , name=value parameters
""",
    re.VERBOSE,
)

#: Names whose value is a whole header (normalised, see is_secret_key); other secret names get
#: _SECRET_VALUE.
_HEADER_NAME_SUFFIXES: Final = ("authorization", "cookie")

#: ``Bearer <token>`` and ``Basic <base64>`` anywhere. An auth parameter such as
#: ``Bearer realm="api"`` (a WWW-Authenticate challenge) is not a credential and is kept.
_AUTH_SCHEME = re.compile(
    r"\b(?P<scheme>Bearer|Basic)(?P<space>\s+)(?![A-Za-z_-]+=[^=])"
    r"(?P<credential>[A-Za-z0-9._~+/-]+=*)",
    re.IGNORECASE,
)

#: A JSON Web Token (JWS or JWE): base64url segments separated by dots, the first a JSON header.
_JWT = re.compile(
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*"
)

#: Credentials with a well-known shape.
_KNOWN_TOKEN = re.compile(
    r"""(?<![A-Za-z0-9])(?:
        (?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])      # AWS access key id
      | gh[pousr]_[A-Za-z0-9]{20,}                    # GitHub token
      | github_pat_[A-Za-z0-9_]{20,}                  # GitHub fine-grained personal access token
      | glpat-[A-Za-z0-9_-]{20,}                      # GitLab personal access token
      | xox[abprs]-[A-Za-z0-9-]{10,}                  # Slack token
      | (?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}   # Stripe secret/restricted/publishable key
      | whsec_[A-Za-z0-9]{20,}                        # Stripe webhook signing secret
      | AIza[A-Za-z0-9_-]{30,}                        # Google API key
      | sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}          # OpenAI / Anthropic style API key
    )""",
    re.VERBOSE,
)


def _redact_auth_scheme(match: re.Match[str]) -> str:
    credential = match["credential"]
    if match["scheme"].lower() == "basic" and not _looks_like_base64(credential):
        return match[0]  # "Basic validation failed" is prose, not a credential
    return f"{match['scheme']}{match['space']}{REDACTED}"


def _looks_like_base64(word: str) -> bool:
    """Whether ``word`` after ``Basic`` is a credential: base64 of ``user:password`` has a digit,
    ``+/=``, or capitals after the first letter, where an English word has none."""
    tail = word[1:]
    return len(word) >= 6 and (any(c.isdigit() or c in "+/=" for c in word) or tail != tail.lower())


#: The pattern passes after the key/value scan, in order.
_REDACTIONS: Final[tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...]] = (
    (_AUTH_SCHEME, _redact_auth_scheme),
    (_JWT, REDACTED),
    (_KNOWN_TOKEN, REDACTED),
)

# --- The steps --------------------------------------------------------------------------------


def sanitize_message(text: object, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """Return ``text`` as one line with its secrets replaced by ``[REDACTED]``, at most
    ``max_length`` characters long (a cut is marked with ``…``).

    Never raises: any object is accepted (``str()`` of it; bytes are decoded as UTF-8), and a
    ``max_length`` below 1 (or not an int) counts as 1 (or the default). Idempotent:
    ``sanitize_message(sanitize_message(x, n), n) == sanitize_message(x, n)``.

    Redacted: ``Bearer``/``Basic`` credentials, JWTs, the values of ``key=value``, ``key: value``
    and JSON/Python-dict pairs whose key names a secret (``password``, ``client_secret``,
    ``access_token``... see :func:`opsrun_core.fingerprint.is_secret_key`), whole
    ``Authorization`` and ``Cookie`` header values, URL passwords, PEM private key blocks, and AWS,
    GitHub, GitLab, Slack, Stripe, Google and OpenAI-style keys.
    """
    limit = _coerce_length(max_length)
    try:
        raw = _as_text(text)
        return _cut(_clean(_bound_input(raw, limit)), limit)
    except Exception:  # pragma: no cover - a bug here must not mask the error being reported
        return REDACTED if limit >= len(REDACTED) else _ELLIPSIS


def _coerce_length(max_length: object) -> int:
    try:
        if isinstance(max_length, SupportsIndex):
            return max(1, operator.index(max_length))
    except Exception:
        pass
    return DEFAULT_MAX_LENGTH


def _as_text(value: object) -> str:
    if isinstance(value, str):
        text = str.__str__(value)  # a plain str, whatever a subclass does
    elif isinstance(value, (bytes, bytearray, memoryview)):
        try:
            text = bytes(value).decode("utf-8", "replace")
        except Exception:
            text = _unprintable(value)
    else:
        try:
            text = str(value)
        except Exception:
            text = _unprintable(value)
    if _SURROGATE.search(text):
        # pair up surrogates that form a character; a lone one becomes U+FFFD
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _unprintable(value: object) -> str:
    try:
        name = type(value).__name__
    except Exception:
        name = "object"
    return f"<unprintable {name}>"


def _bound_input(text: str, limit: int) -> str:
    """Drop input far beyond what the result can hold, with the word the cut lands in."""
    bound = max(_MIN_INPUT_LIMIT, 8 * limit)
    if len(text) <= bound:
        return text
    head = text[:bound]
    words = head.rsplit(None, 1)
    return (words[0] if len(words) == 2 else head) + " " + _ELLIPSIS


def _fold(text: str) -> str:
    text = _CONTROL.sub(" ", text)
    text = _INVISIBLE.sub("", text)
    return _WHITESPACE.sub(" ", text).strip()


def _redact(text: str) -> str:
    text = _PEM_PRIVATE_KEY.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    text = _redact_pairs(text)
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _redact_pairs(text: str) -> str:
    """Redact the value of every ``key=value``-like pair whose key names a secret.

    A scan rather than one ``re.sub``: the value of a harmless pair is not consumed, so a pair
    inside it (``url=https://x/?access_token=...``) is still found.
    """
    parts: list[str] = []
    position = 0
    while (pair := _KEY_AND_SEPARATOR.search(text, position)) is not None:
        parts.append(text[position : pair.end()])
        position = pair.end()
        key = pair["dq"] or pair["sq"] or pair["bare"]
        if not is_secret_key(key):
            continue
        is_header = normalize_key_name(key).endswith(_HEADER_NAME_SUFFIXES)
        value = (_HEADER_VALUE if is_header else _SECRET_VALUE).match(text, position)
        if value is None:
            continue
        parts.append(_redacted_value(value[0]))
        position = value.end()
    parts.append(text[position:])
    return "".join(parts)


def _redacted_value(value: str) -> str:
    for quote in ('\\"', '"', "'"):
        if value.startswith(quote):
            return f"{quote}{REDACTED}{quote}"
    return REDACTED


def _clean(text: str) -> str:
    """Fold and redact until nothing changes."""
    current = _fold(text)
    for _ in range(_MAX_PASSES):
        redacted = _fold(_redact(current))
        if redacted == current:
            return current
        current = redacted
    return REDACTED


def _cut(text: str, max_length: int) -> str:
    """Cut ``text`` to ``max_length`` characters, ``…`` included, at the last point where the
    cut text is left unchanged by another pass (``password=[RED…`` would not be)."""
    if len(text) <= max_length:
        return text
    end = max_length - 1
    while end > 0:
        candidate = text[:end].rstrip() + _ELLIPSIS
        if _fold(_redact(candidate)) == candidate:
            return candidate
        end -= 1
    return _ELLIPSIS
