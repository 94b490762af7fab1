"""Checks a rule runs on a candidate secret after its regex matched.

A regex can say "16 digits" or "word after `password=`"; it cannot say "passes the Luhn
checksum" or "is not a template placeholder". Validators are that second opinion: they keep
the default pack precise without making the patterns unreadable. Each validator is a pure
function `str -> bool` (True: the candidate is sensitive, redact it).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

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


# (issuer prefixes, card lengths): Visa, Mastercard, Amex, Discover, Diners Club, JCB.
_CARD_ISSUERS: tuple[tuple[tuple[str, ...], frozenset[int]], ...] = (
    (("4",), frozenset({13, 16, 19})),
    (("51", "52", "53", "54", "55"), frozenset({16})),
    (tuple(str(n) for n in range(2221, 2721)), frozenset({16})),
    (("34", "37"), frozenset({15})),
    (("6011", "644", "645", "646", "647", "648", "649", "65"), frozenset(range(16, 20))),
    (("36",), frozenset({14})),
    (("300", "301", "302", "303", "304", "305", "38", "39"), frozenset(range(14, 20))),
    (tuple(str(n) for n in range(3528, 3590)), frozenset(range(16, 20))),
)
# No separators, or the same one between groups of 4 (4-4-4-4, 4-4-4-4-3...), Amex/Diners
# 4-6-5 / 4-6-4.
_CARD_GROUPS = re.compile(
    r"^\d{4}(?:([ -])\d{4}(?:\1\d{4}(?:\1\d{4}(?:\1\d{1,3})?|\1\d{1,3})?"
    r"|\1\d{6}\1\d{4,5}|\1\d{1,3})?)?$|^\d{4}([ -])\d{6}\2\d{4,5}$"
)


def card_number(candidate: str) -> bool:
    """A payment card number: a known issuer prefix with one of its lengths, separators in the
    usual groups (4-4-4-4, Amex 4-6-5) or none, and a valid Luhn checksum."""
    digits = "".join(c for c in candidate if c.isdigit())
    if candidate != digits and not _CARD_GROUPS.match(candidate):
        return False
    issuer = any(
        digits.startswith(prefixes) and len(digits) in lengths
        for prefixes, lengths in _CARD_ISSUERS
    )
    return issuer and len(set(digits)) > 1 and luhn(digits)


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
    insert_key_here abc123 abcdef 123456 12345678 123456789 1234567890 foobar foo123
    secret123 password123 pass123 test123 creds cred include omit same-origin
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


# A run of mask characters inside a value (`XXXXXXXX-us2`, `sk-****abcd`, `AQoDY....=`): a
# documented, elided or redacted value, not a live one.
_MASK_RUN = re.compile(r"X{6,}|x{8,}|\*{4,}|•{3,}|\.{3,}|…")


# An identifier split at `_`, `.`, `-` and case humps: words only (the last may end with a
# short number when numbers are allowed).
_ID_SPLIT = re.compile(r"[_.\-]+|(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=\d)(?=[A-Z])")
_ID_VERSION = re.compile(r"^[A-Za-z]{1,3}\d{1,5}$")  # v1Token, ec2_endpoint, x25519_generate
_ID_WORD = re.compile(r"^(?:[A-Z]?[a-z]+|[A-Z]+)$")
_ID_LAST = re.compile(r"^(?:[A-Z]?[a-z]+|[A-Z]+)?\d{1,3}$")
_ID_CHARS = re.compile(r"^[A-Za-z_$][\w$.\-]*$")


def is_identifier(value: str, *, numbered: bool = False) -> bool:
    """A name made of words (NextMarker, SESSION_TOKEN, ssoAccessToken, shared_config_secret;
    with `numbered`, also client-valid-token-1): the name of a field, variable or constant,
    not a secret. A random token does not split into words."""
    if not _ID_CHARS.match(value):
        return False
    pieces = [p for p in _ID_SPLIT.split(value.strip("_$")) if p]
    if len(pieces) < 2:
        return False
    if _ID_VERSION.match(pieces[0]):
        pieces = pieces[1:] or pieces
    last_ok = _ID_WORD.match(pieces[-1]) or (numbered and _ID_LAST.match(pieces[-1]))
    if not last_ok or not all(_ID_WORD.match(p) for p in pieces[:-1]):
        return False
    long = [p for p in pieces if sum(c.isalpha() for c in p) >= 3]
    # Mostly 1-2 letter pieces: random letters (yqDVtkqPECriaLRi), not words.
    return bool(long) and len(pieces) - len(long) <= max(1, len(long) // 2)


# `token1`, `password_2`: a placeholder word numbered.
_NUMBERED_WORD = re.compile(
    r"^(?i:(?:new|old|my|your|test|fake|dummy|sample)[_-]?)?"
    r"(?i:token|secret|password|passwd|pass|pwd|key|apikey|api_key|value|test|foo|bar|example"
    r"|dummy|fake|sample|changeme|my_?password|my_?secret|my_?token)[_-]?\d{1,3}$"
)
# Code: an identifier (or path of them) opening a call, subscript, generic or literal
# (`creds[i]`, `Optional[str]`, `hmac::Key::new(`, `Vec<u8>`, `Config{`); operators and words
# of code (`&&`, `=>`, `this.`, `.method(`, `}else`).
_CODE_HEAD = re.compile(
    r"^(?:[A-Za-z_$][\w$]+|[A-Za-z_$][\w$]*(?:(?:\.|::|->)[A-Za-z_$][\w$]*)+)[\[(<{]"
)
_CODE_TOKENS = re.compile(
    r"&&|\|\||=>|===|!==|\+=|-=|\bthis\.|\bself\.|\bprototype\b|\bfunction\b|\breturn\b"
    r"|\}\s*else|\)\s*\{|\},|\.[A-Za-z_]\w*\(|::<|^\s*\+\s|\s\+\s*$"
    # `username=`, `:py:class:`, `value|default:"x"`. Not `A=B...`: refusing the value of
    # `password = DB_PASSWORD=s3cret` would hide the inner assignment from the rule too.
    r"|^[a-z_]+=$|^:\w+:|\w\|[a-z_]+:"
)
# printf / format / template fields: `%s`, `%(password)s`, `{0}`, `{name}`.
_FORMAT = re.compile(
    r"%\(\w+\)[sdr]|%[sd]\b|\{\d*\}|(?<!\{)\{\.?(?:[a-z_][a-z_.]*|[A-Z_]+)\}(?!\})"
)
# A member path in code: `oauth2client.Credentials`, `config?.disableAuth`, `a::b`.
_CODE_SEGMENT = r"[A-Za-z_$][A-Za-z_$]*\d*[A-Za-z_$]*"
_CODE_PATH = re.compile(rf"^{_CODE_SEGMENT}(?:(?:\??\.|::|->){_CODE_SEGMENT})+$")
# An AWS SigV4 credential scope (`AKID/20160628/us-west-2/s3/aws4_request`): no secret in it.
_SIGV4_SCOPE = re.compile(r"/\d{8}/[a-z0-9-]+/[a-z0-9-]+/aws4_request$")
_INT_LITERAL = re.compile(r"^0[xXoObB][0-9a-fA-F_]+[uUlL]*$")
_PHRASE_CODE = re.compile(
    r"[()\[\]{}|=;<>]|,\s*$|\s#|//|://|\b(?:None|null|undefined|nil|lambda|await|self|this)\b"
    r"|\bor\s+[\w]+\.|\bif\b.*\belse\b"
)


# Published example credentials (AWS documentation keys and session tokens with EXAMPLE in
# them, GitHub's documented example token, RFC examples): every copy of an API reference
# holds them, and they open nothing. The redactor never reports a finding holding one.
KNOWN_EXAMPLES = re.compile(
    r"[A-Za-z0-9/+=]EXAMPLE|EXAMPLE[A-Za-z0-9/+=]"
    r"|16C7e42F292c6912E7710c838347Ae178B4a"  # GitHub REST API docs
    r"|2YotnFZFEjr1zCsicMWpAA|tGzv3JOkF0XG5Qx2TlKWIA|SplxlOBeZQQYbYS6WxSbIA"  # RFC 6749
    r"|mF_9\.B5f-4\.1JqM"  # RFC 6750
    r"|QWxhZGRpbjpvcGVuIHNlc2FtZQ=="  # RFC 7617 (Aladdin:open sesame)
    r"|hJtXIZ2uSN5kbQfbtTNWbpdmhkV8FJG-Onbc6mxCcYg"  # RFC 7520
    r"|evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"  # RFC 8555
)


_ALNUM_RUN = re.compile(r"[a-z0-9]+")


def known_example(value: str) -> bool:
    """A published example credential (see `KNOWN_EXAMPLES`)."""
    return KNOWN_EXAMPLES.search(value) is not None


def not_placeholder(value: str) -> bool:
    """False for templates, variable references and documentation placeholders."""
    stripped = value.strip()
    if len(stripped) < 3:
        return False
    lowered = stripped.lower()
    if lowered in _PLACEHOLDER_WORDS or _TEMPLATE.match(stripped) or _MASK_RUN.search(stripped):
        return False
    words = _ALNUM_RUN.findall(lowered)
    if len(words) > 1 and all(w in _PLACEHOLDER_WORDS for w in words):
        return False  # `SECRET=SECRET`, `user:password`, `token-here`: placeholder words joined
    if lowered.startswith(("my ", "your ")) and len(stripped.split()) <= 4:
        return False  # `My API Key`, `your token here`
    return not (lowered.startswith(("your", "<your", "insert", "enter")) and " " not in stripped)


def credential_value(value: str) -> bool:
    """The right-hand side of `key = value` is a literal, not code or a placeholder.

    Code is full of `password = self.password` or `token = get_token(...)`; those are
    references, not secrets. Rules check the *shape* of unquoted values in the pattern itself
    (a digit, a symbol or mixed case), since quotes already say "this is a literal".
    """
    stripped = value.strip()
    if len(stripped) < 4 or not not_placeholder(stripped) or _NUMBERED_WORD.match(stripped):
        return False
    if "example" in stripped.lower() or _encodes_text(stripped):
        return False
    return not (
        _IDENTIFIER_PATH.match(stripped)
        or _CALL.match(stripped)
        or _CODE_HEAD.match(stripped)
        or _CODE_TOKENS.search(stripped)
        or _FORMAT.search(stripped)
        or _INT_LITERAL.match(stripped)
        or is_identifier(stripped)
        or _CODE_PATH.match(stripped)
        or _SIGV4_SCOPE.search(stripped)
        or _PLAIN_LOCATION.match(stripped)
        or _is_prose(stripped)
    )


_AUTH_SCHEME = re.compile(r"^(?i:bearer|basic|token|digest|bot|key|jwt|otp|ssws|pat)\s+\S+$")
_PLAIN_WORD = re.compile(r"^(?:[a-z]+|[A-Z]+|[A-Z][a-z]+)$")


def credential_token(value: str) -> bool:
    """`credential_value` for tokens, keys and secrets, which are random: also refuses a plain
    word (`include`, `expired`, `JSESSIONID`), function words (`is not`) and numbered names
    (`client-valid-token-1`); an auth scheme and its credential is checked as such
    (`Basic dXNlcjpwYXNz` is user:pass)."""
    stripped = value.strip()
    if len(stripped) < 6 or not credential_value(stripped):
        return False
    if _AUTH_SCHEME.match(stripped):
        credential = stripped.split()[-1]
        return credential_value(credential) and basic_auth_value(credential)
    return basic_auth_value(stripped) and not (
        _PLAIN_WORD.match(stripped)
        or all(w.lower() in _FUNCTION_WORDS for w in stripped.split())
        or is_identifier(stripped, numbered=True)
    )


def basic_auth_value(value: str) -> bool:
    """False for HTTP Basic credentials that are placeholders: `dXNlcjpwYXNz` (user:pass),
    `dXNlcjo=` (user: an empty password leaves the user part as the credential, as for API
    keys sent as the user name). True for anything else, including what is not base64."""
    stripped = value.strip()
    try:
        decoded = base64.b64decode(stripped, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return True
    user, colon, password = decoded.partition(":")
    if not colon:
        return True
    return (password or user).lower() not in _PLACEHOLDER_WORDS


_BASE64 = re.compile(r"^(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")


def _encodes_text(value: str) -> bool:
    """Base64 of a sentence (`dGhpcyBpcyBub3QgYSByZWFsIHZhbHVl` = "this is not a real
    value"): documentation, not a credential. Random keys decode to binary."""
    if len(value) < 16 or not _BASE64.match(value):
        return False
    try:
        decoded = base64.b64decode(value, validate=True).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return False
    return decoded.isprintable() and " " in decoded and (_is_prose(decoded) or decoded.isalpha())


def _decodes_to_text(value: str) -> bool:
    """Standard or URL-safe base64 of printable text with spaces (a sentence, a JSON
    document): an encoded message, not a key (random keys decode to binary)."""
    body = value.replace("-", "+").replace("_", "/")
    body += "=" * (-len(body) % 4)
    try:
        decoded = base64.b64decode(body, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return False
    return decoded.isprintable() and (" " in decoded or decoded.startswith(("{", "[")))


def url_password(value: str) -> bool:
    """The password of a URL's user info, percent-decoded, is no placeholder (`pass%20pass`,
    `pass%3Bword`)."""
    decoded = unquote(value)
    letters = re.sub(r"[^a-z0-9]", "", decoded.lower())
    half = len(letters) // 2
    doubled = len(letters) % 2 == 0 and letters[:half] == letters[half:]
    if letters in _PLACEHOLDER_WORDS or (doubled and letters[:half] in _PLACEHOLDER_WORDS):
        return False
    return not_placeholder(decoded)


def credential_phrase(value: str) -> bool:
    """`credential_value` for a value with spaces up to the end of a line (a passphrase):
    also refuses the rest of a line of code (`str | None = None,`, `x or self.x,`,
    `lambda: f(`), comments and URLs."""
    return credential_value(value) and not _PHRASE_CODE.search(value)


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


def _is_prose(value: str) -> bool:
    """A sentence or description: 4+ words with function words (`the`, `to`, `for`...), or
    10+ words. Passphrases are a few content words (`correct horse battery staple`)."""
    words = value.split()
    if len(words) < 4:
        return False
    if len(words) >= 10:
        return True
    function = sum(1 for w in words if w.lower().strip(".,;:()<>/") in _FUNCTION_WORDS)
    return function >= 3 or (function >= 2 and value.rstrip().endswith((".", ":")))


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
    return credential_field_value(value) and not is_identifier(value.strip(), numbered=True)


_BLOCK_VALUE = re.compile(
    r"^[ \t]*(?:[\w.-]+:[ \t]*)?['\"]?([^'\"\s#|>][^'\"]*?)['\"]?[ \t]*$", re.M
)


_KEY_RUN = re.compile(r"[A-Za-z0-9+/]{40,}")
_ESCAPED_SPACE = re.compile(r"(?:\\[rnt]|\\|\s)+")


def key_material(body: str) -> bool:
    """A private key body that is not blank or a placeholder (`<a very long private key
    string>`, `...`, `{{ key }}`): key material (a run of 40+ base64 characters, as in every
    line of a PEM body) or any other text."""
    if _KEY_RUN.search(body):
        return True
    compact = _ESCAPED_SPACE.sub(" ", body).strip()
    return bool(compact) and not_placeholder(compact) and "{{" not in compact


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
_SRI = re.compile(r"^(?:sha\d{1,3}|md5)-")  # subresource integrity: a hash
_UUID = re.compile(r"^[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")


_LOWER_RUN = re.compile(r"[a-z]{4,}")


def _wordy(value: str) -> bool:
    """Mostly runs of 4+ lowercase letters (`SponsoredProductsRemoteSearchClickPagination`):
    words glued into a name. Random base64 rarely has such runs."""
    return sum(len(run) for run in _LOWER_RUN.findall(value)) * 2 > len(value)


def high_entropy_token(value: str) -> bool:
    """A random-looking token: hex with near-uniform digits, or base64 with high entropy.

    Git SHAs (40 hex), SHA-256 digests (64 hex) and UUIDs are ids, not secrets.
    """
    if _UUID.match(value) or _SRI.match(value) or not token_shape(value) or _wordy(value):
        return False
    if set(value) <= _HEX:
        return len(value) not in (40, 64) and shannon_entropy(value) >= 3.0
    return shannon_entropy(value) >= 4.2


_IMAGE_BASE64 = ("iVBORw0KGgo", "R0lGOD", "/9j/", "UklGR", "PHN2Zy", "Qk0")


def random_token(value: str) -> bool:
    """A long token no context names, random enough to be a key (default profile): 40+
    characters mixing upper case, lower case and digits with high entropy, not hex (hashes,
    ids), not a hash in SRI form, not base64 of text or of an image, not a name."""
    if len(value) < 40 or set(value) <= _HEX or _SRI.match(value) or _UUID.match(value):
        return False
    if not (
        any(c.isupper() for c in value)
        and any(c.islower() for c in value)
        and sum(c.isdigit() for c in value) >= 2
    ):
        return False
    if value.startswith(_IMAGE_BASE64) or _decodes_to_text(value) or _wordy(value):
        return False
    # Random base64 of 40+ characters has ~5 bits per character; words and paths far less.
    return shannon_entropy(value) >= min(4.6, 0.9 * math.log2(len(value)))


# --- wallets ----------------------------------------------------------------------------

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_INDEX = {c: i for i, c in enumerate(_BASE58)}


def _base58check(value: str) -> bytes | None:
    """The payload of a Base58Check string (its 4-byte double-SHA-256 checksum verified)."""
    number = 0
    for char in value:
        digit = _BASE58_INDEX.get(char)
        if digit is None:
            return None
        number = number * 58 + digit
    pad = len(value) - len(value.lstrip("1"))
    raw = b"\0" * pad + number.to_bytes((number.bit_length() + 7) // 8, "big")
    payload, checksum = raw[:-4], raw[-4:]
    if len(raw) < 5 or hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4] != checksum:
        return None
    return payload


def wif_private_key(value: str) -> bool:
    """A Bitcoin private key in Wallet Import Format: Base58Check of 0x80 (mainnet) or 0xef
    (testnet), 32 key bytes and, for a compressed key, 0x01."""
    payload = _base58check(value)
    if payload is None or payload[:1] not in (b"\x80", b"\xef"):
        return False
    return len(payload) == 33 or (len(payload) == 34 and payload[-1] == 1)


# Version bytes of BIP-32 extended private keys: xprv, tprv, yprv, zprv, Yprv, Zprv, uprv,
# vprv, Uprv, Vprv.
_XPRV_VERSIONS = frozenset(
    bytes.fromhex(v)
    for v in (
        "0488ade4", "04358394", "049d7878", "04b2430c", "0295b005", "02aa7a99", "044a4e28",
        "045f18bc", "024285b5", "02575048",
    )
)  # fmt: skip


def extended_private_key(value: str) -> bool:
    """A BIP-32 extended private key (xprv...): Base58Check of 78 bytes with a private-key
    version and a 0x00-prefixed key."""
    payload = _base58check(value)
    return (
        payload is not None
        and len(payload) == 78
        and payload[:4] in _XPRV_VERSIONS
        and payload[45] == 0
    )


@functools.cache
def bip39_words() -> frozenset[str]:
    """The BIP-39 English word list (data/bip39-english.txt, 2048 words)."""
    text = (Path(__file__).parent / "data" / "bip39-english.txt").read_text(encoding="utf-8")
    words = frozenset(text.split())
    if len(words) != 2048:
        raise ValueError("the BIP-39 word list must have 2048 words")
    return words


def bip39_phrase(value: str) -> bool:
    """A BIP-39 seed phrase: 12, 15, 18, 21 or 24 words, all from the English list, not one
    word repeated (`word word word...` in documentation)."""
    words = value.lower().split()
    known = bip39_words()
    return (
        len(words) in (12, 15, 18, 21, 24)
        and all(w in known for w in words)
        and len(set(words)) > len(words) // 3
    )


def hex_private_key(value: str) -> bool:
    """32 bytes of hex (optionally 0x-prefixed) that look random: not one repeated digit, not
    a run such as 0123...; the key of an Ethereum / secp256k1 / ed25519 wallet."""
    digits = value[2:] if value[:2] in ("0x", "0X") else value
    return (
        len(digits) == 64
        and set(digits) <= _HEX
        and shannon_entropy(digits.lower()) >= 3.0
        and digits.lower() not in "0123456789abcdef" * 8
    )


# name -> factory(argument) -> validator. Argument-less validators take `None`.
REGISTRY: dict[str, Callable[..., Validator]] = {
    "luhn": lambda _: luhn,
    "card_number": lambda _: card_number,
    "iban": lambda _: iban,
    "us_ssn": lambda _: us_ssn,
    "not_placeholder": lambda _: not_placeholder,
    "credential_value": lambda _: credential_value,
    "credential_phrase": lambda _: credential_phrase,
    "url_password": lambda _: url_password,
    "credential_token": lambda _: credential_token,
    "basic_auth_value": lambda _: basic_auth_value,
    "token_shape": lambda _: token_shape,
    "literal_block_values": lambda _: literal_block_values,
    "key_material": lambda _: key_material,
    "high_entropy_token": lambda _: high_entropy_token,
    "random_token": lambda _: random_token,
    "wif_private_key": lambda _: wif_private_key,
    "extended_private_key": lambda _: extended_private_key,
    "bip39_phrase": lambda _: bip39_phrase,
    "hex_private_key": lambda _: hex_private_key,
    "credential_field_value": lambda _: credential_field_value,
    "credential_field_token": lambda _: credential_field_token,
    "min_entropy": lambda arg: min_entropy(float(arg)),
    "min_length": lambda arg: min_length(int(arg)),
}
# Validators that need an argument (`{min_entropy: 3.5}`) and its type.
ARGUMENT_TYPES: dict[str, type] = {"min_entropy": float, "min_length": int}
