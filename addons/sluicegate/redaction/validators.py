"""Checks a rule runs on a candidate secret after its regex matched.

A regex can say "16 digits" or "word after `password=`"; it cannot say "passes the Luhn
checksum" or "is not a template placeholder". Validators are that second opinion: they keep
the default pack precise without making the patterns unreadable. Each validator is a pure
function `str -> bool` (True: the candidate is sensitive, redact it).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable

Validator = Callable[[str], bool]


def luhn(candidate: str) -> bool:
    """Payment card checksum; separators (spaces, dashes) are ignored."""
    digits = [int(c) for c in candidate if c.isdigit()]
    if len(digits) < 12:
        return False
    total = 0
    for index, digit in enumerate(reversed(digits)):
        if index % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


# ISO 13616 lengths per country: a checksum alone accepts 1 in 97 random strings.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban(candidate: str) -> bool:
    """IBAN: known country, its exact length, and the ISO 7064 mod-97 checksum."""
    compact = "".join(candidate.split()).upper()
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def us_ssn(candidate: str) -> bool:
    """US SSN ranges that were never issued (000, 666, 9xx areas; 00 group; 0000 serial)."""
    digits = "".join(c for c in candidate if c.isdigit())
    if len(digits) != 9:
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    # Numbers used in advertising and documentation, never valid.
    return digits not in ("078051120", "219099999", "123456789")


def shannon_entropy(value: str) -> float:
    """Bits per character; random base64 is ~6, English words ~3-4 at word length."""
    if not value:
        return 0.0
    length, log2 = len(value), math.log2
    return -sum([n / length * log2(n / length) for n in Counter(value).values()])


def min_entropy(threshold: float) -> Validator:
    def check(value: str) -> bool:
        return shannon_entropy(value) >= threshold

    check.__name__ = f"min_entropy({threshold})"
    return check


def min_length(length: int) -> Validator:
    def check(value: str) -> bool:
        return len(value) >= length

    check.__name__ = f"min_length({length})"
    return check


# Values that are obviously not the secret itself: templates, variables, documentation.
_PLACEHOLDER_WORDS = frozenset(
    """
    password passwd pass pwd secret secrets token tokens key apikey api_key api-key apitoken
    xxx xxxx yyy zzz changeme change_me changeit replace_me replaceme your_password
    yourpassword mypassword my_password your_token your_api_key your-api-key your_secret
    example sample test testing dummy fake foo bar baz qux placeholder redacted hidden none
    null nil undefined true false yes no empty string str value values required optional todo
    fixme tbd env username user login admin root default secret_key secretkey access_token
    accesstoken private_key privatekey client_secret bearer basic token_here key_here
    insert_key_here
    """.split()  # noqa: SIM905 - a word list reads better here
)
_TEMPLATE = re.compile(
    r"""^(?:
        \$\{.* | \$\(.* | \$[A-Za-z_][\w]*                 # shell/compose/CI variables
      | \{\{.* | \{%.* | <%.*                               # jinja, helm, erb templates
      | <[^>]*>? | \[[A-Z0-9_ -]*\]? | \{[A-Za-z_]+\}         # documentation placeholders
      | %[sdr] | %\(\w+\)[sdr]                              # printf
      | (?:os\.)?(?:getenv|environ|process\.env|ENV|env)\b.*  # lookups, not values
      | [xX*._\-#]{3,}                                     # masks such as ******** or xxxxx
    )$""",
    re.VERBOSE,
)
# A code reference: dotted/arrow path of identifiers (digits only at a segment's end, unlike
# random tokens), optionally called; or a call expression.
_SEGMENT = r"[A-Za-z_$][A-Za-z_$]*\d*"
_IDENTIFIER_PATH = re.compile(rf"^{_SEGMENT}(?:(?:\.|::|->){_SEGMENT})+(?:\(\))?$")
_CALL = re.compile(rf"^{_SEGMENT}(?:\.{_SEGMENT})*\(")


# A run of mask characters inside a value (`XXXXXXXX-us2`, `sk-****abcd`): a documented or
# redacted value, not a live one.
_MASK_RUN = re.compile(r"X{6,}|x{8,}|\*{4,}|•{3,}")


def not_placeholder(value: str) -> bool:
    """False for templates, variable references and documentation placeholders."""
    stripped = value.strip()
    if len(stripped) < 3:
        return False
    lowered = stripped.lower()
    if lowered in _PLACEHOLDER_WORDS or _TEMPLATE.match(stripped) or _MASK_RUN.search(stripped):
        return False
    return not (lowered.startswith(("your", "<your", "insert", "enter")) and " " not in stripped)


def credential_value(value: str) -> bool:
    """The right-hand side of `key = value` is a literal, not code or a placeholder.

    Code is full of `password = self.password` or `token = get_token(...)`; those are
    references, not secrets. Rules check the *shape* of unquoted values in the pattern itself
    (a digit, a symbol or mixed case), since quotes already say "this is a literal".
    """
    stripped = value.strip()
    if len(stripped) < 4 or not not_placeholder(stripped):
        return False
    return not (_IDENTIFIER_PATH.match(stripped) or _CALL.match(stripped))


# --- values of credential-named fields (key rules) ------------------------------------------

# Words a field's value holds in schemas and documentation rather than a credential.
_FIELD_WORDS = frozenset(
    """
    string integer int number float double boolean bool object array binary byte bytes date
    datetime date-time uuid email uri url hostname format sensitive secret write-only
    writeonly readonly read-only on off enabled disabled enable disable required optional
    masked hidden auto any all n/a na unset inherit
    """.split()  # noqa: SIM905
)
_FUNCTION_WORDS = frozenset(
    """
    the a an to of for in on is are be this that with and or if by from as it its use used
    your you when which not can will must should may was were has have
    """.split()  # noqa: SIM905
)
# 1.2.3, ^1.2, ~0.7.1, >=2 (a bare number is no version: it could be a PIN).
_VERSION_ATOM = (
    r"(?:(?:[~^]|[<>]=?|={1,2}|~=|!=)\s*v?\d+(?:\.(?:\d+|[xX*]))*|v?\d+(?:\.(?:\d+|[xX*]))+)"
    r"(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
)
_VERSION_SPEC = re.compile(
    rf"^(?:{_VERSION_ATOM}(?:\s*(?:,|\|\||\s-\s|\s)\s*{_VERSION_ATOM})*"
    r"|[*xX]|latest|next|beta|canary"
    r"|(?:npm|workspace|file|link|portal|patch|catalog|github|gitlab|bitbucket):[^\s@]*(?:@[^\s:@]*)?)$"
)
# A URL or path with no user info and no credential-named query parameter: a location, not a
# credential.
_PLAIN_LOCATION = re.compile(
    r"^(?:(?:https?|wss?|git|ssh|s3|gs|file)://[^\s/@?#:]+(?::\d+)?(?:/[^\s?#@]*)?"
    r"(?:\?(?![^#]*(?i:key|token|secret|sig|pass|auth|cred|code|session))[^\s#@]*)?"
    r"|(?:~|\.{1,2})?/[\w.@~+-]+(?:/[\w.@~+-]*)*)$"
)
# The name of a field, header or variable: words joined by `_`, `.`, `-` or case humps, no
# digit (NextToken, next_token, SESSION_TOKEN, x-amz-security-token, accessKeyId).
_FIELD_NAME = re.compile(
    r"^(?:[A-Za-z][a-z]*(?:[A-Z][a-z]+)+|[A-Za-z]+(?:[_.:-][A-Za-z]+)+|[A-Z][a-z]+(?:[A-Z][a-z]*)+)$"
)


def _is_prose(value: str) -> bool:
    words = value.split()
    if len(words) < 4:
        return False
    if len(words) >= 10:
        return True
    function = sum(1 for w in words if w.lower().strip(".,;:()<>/") in _FUNCTION_WORDS)
    return function >= 2


def credential_field_value(value: str) -> bool:
    """A string value of a credential-named field (`"password": ...`) is one, unless it is a
    placeholder, a schema or documentation word, prose (a description), a version range (a
    dependency map: `"cookie": "~0.7.1"`) or a plain URL or path."""
    stripped = value.strip()
    lowered = stripped.lower()
    if not stripped or lowered in _PLACEHOLDER_WORDS or lowered in _FIELD_WORDS:
        return False
    if len(stripped) < 3:
        return True  # short, but the field says it is a password
    return not_placeholder(stripped) and not (
        _is_prose(stripped) or _VERSION_SPEC.match(stripped) or _PLAIN_LOCATION.match(stripped)
    )


def credential_field_token(value: str) -> bool:
    """`credential_field_value`, and not the name of another field (`"input_token":
    "NextToken"` in a paginator, `"token": "SESSION_TOKEN"`): tokens, keys and secrets are
    random, a name is words."""
    return credential_field_value(value) and not _FIELD_NAME.match(value.strip())


_BLOCK_VALUE = re.compile(
    r"^[ \t]*(?:[\w.-]+:[ \t]*)?['\"]?([^'\"\s#|>][^'\"]*?)['\"]?[ \t]*$", re.M
)


def literal_block_values(block: str) -> bool:
    """A YAML block (e.g. Secret data) holding at least one literal value, not only templates."""
    for match in _BLOCK_VALUE.finditer(block):
        value = match.group(1)
        if not value.endswith(":") and not_placeholder(value) and "{{" not in value:
            return True
    return False


def token_shape(value: str) -> bool:
    """Long random-looking token: mixes letters and digits, not one repeated character."""
    has_digit = any(map(str.isdigit, value))
    return has_digit and any(map(str.isalpha, value)) and len(set(value)) >= 6


_HEX = frozenset("0123456789abcdefABCDEF")
_UUID = re.compile(r"^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


def high_entropy_token(value: str) -> bool:
    """A random-looking token: hex with near-uniform digits, or base64 with high entropy.

    Git SHAs (40 hex), SHA-256 digests (64 hex) and UUIDs are ids, not secrets.
    """
    if _UUID.match(value) or not token_shape(value):
        return False
    if set(value) <= _HEX:
        return len(value) not in (40, 64) and shannon_entropy(value) >= 3.0
    return shannon_entropy(value) >= 4.2


# name -> factory(argument) -> validator. Argument-less validators take `None`.
REGISTRY: dict[str, Callable[..., Validator]] = {
    "luhn": lambda _: luhn,
    "iban": lambda _: iban,
    "us_ssn": lambda _: us_ssn,
    "not_placeholder": lambda _: not_placeholder,
    "credential_value": lambda _: credential_value,
    "token_shape": lambda _: token_shape,
    "literal_block_values": lambda _: literal_block_values,
    "high_entropy_token": lambda _: high_entropy_token,
    "credential_field_value": lambda _: credential_field_value,
    "credential_field_token": lambda _: credential_field_token,
    "min_entropy": lambda arg: min_entropy(float(arg)),
    "min_length": lambda arg: min_length(int(arg)),
}
# Validators that need an argument (`{min_entropy: 3.5}`) and its type.
ARGUMENT_TYPES: dict[str, type] = {"min_entropy": float, "min_length": int}
