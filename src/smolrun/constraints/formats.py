"""String formats: which ones llguidance enforces, which ones smolrun enforces with its own patterns."""

from __future__ import annotations

# An unknown format stays visible in the compiled schema under this key (llguidance ignores "x-" keys), so
# that the grammar built from it can say which formats it did not enforce.
IGNORED_FORMAT = "x-smolrun-ignored-format"

# Formats llguidance 1.9 enforces itself.
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"})

# llguidance's own date/time formats let a few invalid values through (2021-02-30, a 60th second, year 0), so
# these are enforced with stricter regular expressions. February 29th is never produced: a regex
# cannot know leap years, and a guarantee beats completeness.
_DATE = (
    r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    r"|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
STRICT_FORMATS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$"}

# The other formats JSON Schema 2020-12 defines, each as a pattern. Exact for the JSON pointers; the others
# allow a plain subset only (every string allowed is valid, not every valid string is allowed).
_SEGMENT = r"[A-Za-z0-9._~-]"
_URI_REFERENCE = (rf"^(?:[A-Za-z][A-Za-z0-9+.-]*:)?(?://[A-Za-z0-9.-]*)?(?:/?{_SEGMENT}+)*/?"
                  rf"(?:\?[A-Za-z0-9._~=&/-]*)?(?:#[A-Za-z0-9._~/-]*)?$")
PATTERN_FORMATS = {
    "json-pointer": r"^(?:/(?:[^~/]|~[01])*)*$",
    "relative-json-pointer": r"^(?:0|[1-9][0-9]*)(?:#|(?:/(?:[^~/]|~[01])*)*)$",
    "uri-reference": _URI_REFERENCE,
    "iri-reference": _URI_REFERENCE,
    "uri-template": r"^[A-Za-z0-9!#$&()*+,./:;=?@_~-]*$",  # literal text, no expressions
    "regex": r"^[A-Za-z0-9 _,:;'\"=<>@#%&~!-]*$",  # characters that stand for themselves
}
# Formats whose values are a superset of another's: the narrower one is enforced.
ALIASES = {"idn-email": "email", "idn-hostname": "hostname", "iri": "uri"}
