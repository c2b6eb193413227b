"""The URLs the image fetcher (`automask.imageio.fetch`) takes: http(s) only, with a host written plainly that a
resolver takes (`parse_url`); a redirect's Location read as the next one (`redirect_target`); and URLs as messages show
them (credentials left out, shortened: `show`)."""

from __future__ import annotations

import re
import string
import urllib.parse

import httpx

from automask.errors import FetchError, URLRefusedError

_CREDENTIALS = re.compile(r"([\s\x00-\x20]*(?:[a-zA-Z][a-zA-Z0-9+.-]*:[/\\]*|[/\\]{2})).*@", re.DOTALL)
"""A URL's scheme and the slashes after it (or the '//' of a Location relative to it), and all up to its last '@':
what may be a user name and password. The slashes may be backslashes, or one or none: a browser reads
`http:\\\\user:pw@host`, `http:/user:pw@host` and `http:user:pw@host` as `http://user:pw@host`."""


def _without_credentials(text: str) -> str | None:
    """`text`, a URL as written, with what may be its user name and password (`_CREDENTIALS`) replaced by '…', or
    None when it holds none."""
    hidden = _CREDENTIALS.match(text)
    return None if hidden is None else hidden.group(1) + "…@" + text[hidden.end() :]


def parse_url(url: str) -> httpx.URL:
    """Parse an http(s) URL with a host; anything else raises URLRefusedError."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError) as exc:
        raise URLRefusedError(_unreadable(url, exc)) from None
    if parsed.scheme not in ("http", "https"):
        raise URLRefusedError(
            f"Refused the image URL {show(parsed)}: only http:// and https:// URLs are fetched "
            f"(got {parsed.scheme + '://' if parsed.scheme else 'no scheme'}). Send the image data instead."
        )
    flaw = _flaw(parsed)
    if flaw:
        raise URLRefusedError(f"Refused the image URL {show(parsed)}: {flaw}")
    return parsed


def _unreadable(url: str, exc: Exception) -> str:
    """The refusal of `url`, which httpx cannot read. One that may hold a user name or password (an '@' after its
    scheme) is shown without them, and httpx's reason, which may quote a piece of one ("Invalid port: 'secret'" for a
    '/' in the password), is left out."""
    flaw = _host_flaw(url) if isinstance(url, str) else None
    hidden = _without_credentials(url) if isinstance(url, str) else None
    if hidden is None:
        return f"Refused the image URL {short(url)}: {flaw or f'it is not a valid URL ({exc}).'}"
    why = flaw or (
        "it is not a valid URL (check the user name and password in it: a '/', '?', '#' or '@' in them must be "
        "percent-encoded)."
    )
    return f"Refused the image URL {short(hidden)}: {why}"


def _flaw(parsed: httpx.URL) -> str | None:
    """What makes an http(s) URL unusable (a sentence), or None."""
    if not parsed.raw_host:
        return "it has no host."
    if parsed.port is not None and not 0 < parsed.port <= 65535:  # httpx takes any number
        return f"port {parsed.port} is not a TCP port (1–65535)."
    host = urllib.parse.unquote(parsed.raw_host.decode("ascii"))
    if odd := _unfit_in_host(host):  # written so, or percent-encoded (by httpx: a space; or in the URL: %22)
        return _holds(odd)  # (was: a '%' not written; or, for '"', '{', '|', 502 "could not resolve")
    if b"%" in parsed.raw_host:  # httpx keeps it as sent; no resolver reads it (was: 502 "could not resolve")
        return (
            "its host holds '%' (a percent-encoded name, or an IPv6 zone such as %25eth0, which names a local "
            "network interface). Write the host name or address plainly."
        )
    return _name_flaw(host)


def _name_flaw(host: str) -> str | None:
    """What makes host name `host` one no resolver looks up (RFC 1035: labels of 1 to 63 characters, at most 253 in
    all, a final '.' aside), a sentence; None for a name that has none, or an IPv6 address. (Was: the resolver's
    "encoding with 'idna' codec failed (UnicodeError: label empty or too long)", a 502 blaming the server.)"""
    if ":" in host:
        return None
    name = host.removesuffix(".")
    if len(name) > 253:
        return f"its host name is {len(name)} characters long; a host name is at most 253. Correct the host name."
    labels = name.split(".")
    if "" in labels:
        return "its host name has an empty label (two dots in a row, or a dot first). Correct the host name."
    longest = max(len(label) for label in labels)
    if longest > 63:
        return f"its host name has a label of {longest} characters; a label is at most 63. Correct the host name."
    return None


_HOST_ASCII = frozenset(string.ascii_letters + string.digits + "-._:%")
"""The ASCII characters a host may hold: a name's letters, digits, '-', '.' and '_', an IPv6 address's ':' (`%` is
`_flaw`'s own case)."""


def _unfit_in_host(host: str) -> str | None:
    """The characters of `host` (percent-escapes decoded) that no host name or address holds (ASCII ones but
    `_HOST_ASCII`, and white space), described ("a space, '<'"), or None. httpx keeps `"`, `{`, `|` ... in a host,
    percent-encodes a space, `<`, `^` ..., and refuses any of them beside a non-ASCII letter (IDNA)."""
    odd = dict.fromkeys(c for c in host if c.isspace() or (c.isascii() and c not in _HOST_ASCII))
    return ", ".join("a space" if c == " " else repr(c) for c in odd) or None


def _host_flaw(url: str) -> str | None:
    """The sentence naming what no host holds in the host of `url`, a URL httpx refused (an IDNA name with such a
    character); None when it has none (httpx's own message then says what is wrong)."""
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return None
    odd = _unfit_in_host(urllib.parse.unquote(host))
    return _holds(odd) if odd else None


def _holds(odd: str) -> str:
    return f"its host holds {odd}, which no host name or address has. Correct the host name."


def redirect_target(current: httpx.URL, location: str) -> httpx.URL:
    """The URL a redirect's Location points to (relative to `current`), checked like the first one. An invalid
    one (no host, a bad port, ...) is the server's fault, FetchError (502) as any other invalid Location (was: some
    400, some 502), shown without the user name and password it may hold (`_shown_location`); one to another scheme
    is refused (URLRefusedError, 400) as a first URL would be."""
    httpx_reason = None
    try:  # as httpx reads a Location (`Client._redirect_url`), which it did before `_stop_at_redirect`
        written, target = httpx.URL(location), current.join(location)
        web = target.scheme in ("http", "https")
        no_host = web and bool(written.scheme) and not written.raw_host  # "http:x.png": not taken for "x.png"
        flaw = "it has a scheme but no host." if no_host else _flaw(target) if web else None
        # an IDNA name is not decoded (httpx's `URL.host`): one IDNA 2008 refuses (xn--ls8h.la, an emoji domain
        # registered under IDNA 2003) is followed as written, as the first URL is fetched
    except (httpx.InvalidURL, UnicodeError) as exc:
        flaw, httpx_reason = _host_flaw(location), f"{exc}."
    if flaw or httpx_reason:
        shown = _shown_location(location, flaw, httpx_reason)
        raise FetchError(f"The image URL {show(current)} redirected to an invalid URL ({shown}).")
    return parse_url(str(target))


def _shown_location(location: str, flaw: str | None, httpx_reason: str | None) -> str:
    """'LOCATION: WHY' for the message refusing an invalid redirect: the Location shortened, its user name and
    password left out when it may hold them (an '@' after its '//'), and then httpx's reason too, which may quote a
    piece of one ("Invalid port: 's3'" for a '/' in the password)."""
    why = flaw or httpx_reason or ""
    hidden = _without_credentials(location)
    if hidden is not None:
        location = hidden
        why = flaw or "it is not a valid URL (a '/', '?', '#' or '@' in its user name or password is not escaped)."
    return f"{short(location, 80)}: {why[:-1]}"


def port_of(url: httpx.URL) -> int:
    """The TCP port `url` names, or its scheme's."""
    return url.port or (443 if url.scheme == "https" else 80)


def shown_host(url: httpx.URL) -> str:
    """`url`'s host for a message: as a person writes it (an IDNA name decoded), or as sent when IDNA 2008 does not
    decode it (an emoji domain such as xn--ls8h.la, registered under IDNA 2003, is looked up and fetched so)."""
    try:
        return url.host
    except UnicodeError:
        return url.raw_host.decode("ascii")


def show(url: httpx.URL) -> str:
    """`url` for an error message: credentials left out, shortened."""
    if url.userinfo:
        return short(str(url.copy_with(username=None, password=None)))
    hidden = None if url.raw_host else _without_credentials(str(url))  # `http:/user:pw@host`: no host, a path
    return short(hidden or str(url))


def without_credentials(url: str) -> str:
    """`url` as typed, but for its user name and password, left out (unshortened, as a record's "input"). One httpx
    cannot read keeps its scheme and all after its last '@' (`_CREDENTIALS`)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, UnicodeError):
        return _without_credentials(url) or url
    return str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else url


def short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
