"""False-positive classes of issue 15 (precision): each class keeps its positives and leaves its
clean cases untouched. The clean cases are taken from real package sources, lock files and API
specs (see bench/clean_corpus.yaml); the positives are fake credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluicegate.redaction.json_redact import redact_json_text
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack

RULES = Path(__file__).resolve().parents[2] / "rules"
PROFILES = ("default", "strict", "pii", "strict-pii")
REDACTORS = {p: Redactor(load_rule_pack([RULES], p), Direction.REQUEST) for p in PROFILES}
DEFAULT = REDACTORS["default"]


def unchanged_json(document: object, profile: str = "default") -> bool:
    text = json.dumps(document)
    result = redact_json_text(text, REDACTORS[profile])
    return not result.changed and result.text is text


# --- 1, 2: key rules: strings only, and only credential-looking ones -------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_key_rules_never_touch_schemas_or_tool_definitions(profile: str) -> None:
    login_tool = {
        "type": "function",
        "function": {
            "name": "login",
            "parameters": {
                "type": "object",
                "properties": {
                    "username": {"type": "string"},
                    "password": {"type": "string", "description": "The user's password."},
                    "api_key": {"type": "string", "format": "password", "writeOnly": True},
                    "token": {"type": "integer", "minimum": 0},
                    "cookie": {"$ref": "#/components/schemas/Cookie"},
                },
            },
        },
    }
    assert unchanged_json({"tools": [login_tool], "token": 42, "secret": True}, profile)


@pytest.mark.parametrize("profile", PROFILES)
def test_key_rules_leave_dependency_maps_paginators_and_docs(profile: str) -> None:
    lock = {"node_modules/express": {"version": "4.21.2", "dependencies": {
        "cookie": "0.7.1", "cookie-signature": "1.0.6", "cookies": "~0.9.1"}}}  # fmt: skip
    paginator = {"pagination": {"ListSecrets": {
        "input_token": "NextToken", "output_token": "NextToken", "limit_key": "MaxResults"}},
        "token": "nextPageToken", "secret": "SecretString"}  # fmt: skip
    discovery = {"parameters": {"password": "The password to use to connect to a resource.",
                                "credentials": "https://example.com/docs/credentials",
                                "secret": "https://github.githubassets.com/unicode/3299.png?v8",
                                "api_key": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX-us2"}}  # fmt: skip
    for document in (lock, paginator, discovery):
        assert unchanged_json(document, profile)


def test_key_rules_do_not_apply_in_documented_examples() -> None:
    spec = {"responses": {"201": {"content": {"application/json": {"examples": {"default": {
        "value": {"client_secret": "1726be1638095a19edd134c77bde3aa2ece1e5d8"}}}}}}}}  # fmt: skip
    botocore = {"version": "1.0", "examples": {"ChangePassword": [{"input": {
        "NewPassword": "]35d/{pB9Fo9wJ", "OldPassword": "3s0K_;xh4~8XXI"}}]}}  # fmt: skip
    assert unchanged_json(spec) and unchanged_json(botocore)


def test_key_rules_still_mask_credential_strings() -> None:
    document = {
        "password": "Tr0ub4dor&3",
        "db": {"passphrase": "correct horse battery staple", "dsn": "postgres://a:b3@h/d"},
        "client_secret": "9f8e7d6c5b4a39281706f5e4",
        "token": ["t0k3n-a", 7],
        "headers": {"Cookie": "session=abc123; theme=dark"},
    }
    result = redact_json_text(json.dumps(document), DEFAULT)
    data = json.loads(result.text)
    assert "Tr0ub4dor" not in result.text and "b3@" not in result.text
    assert data["password"] == "[REDACTED:key-password]"
    assert data["db"]["passphrase"] == "[REDACTED:key-password]"
    assert data["token"] == ["[REDACTED:key-token]", 7]
    assert data["headers"]["Cookie"] == "[REDACTED:key-authorization]"
    assert result.counts["key-secret"] == 1


def test_text_rules_still_run_where_key_rules_do_not() -> None:
    gh = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
    document = {"examples": {"x": {"token": gh}}, "cookie": f"see the token {gh} in the docs"}
    result = redact_json_text(json.dumps(document), DEFAULT)
    assert "ghp_" not in result.text and result.counts == {"github-token": 2}


def redacts(text: str, secret: str, profile: str = "default") -> bool:
    return secret not in REDACTORS[profile].redact_text(text).text


def untouched(text: str, profile: str = "default") -> bool:
    return not REDACTORS[profile].redact_text(text).changed


# --- 3: code is no credential -------------------------------------------------------------

CODE = [
    "        _request_auth=_request_auth,",  # identifiers
    "    api_key: Optional[str] = None",  # type annotations
    "    api_key: str | None = None,",
    "    auth_token: string | null;",
    "    access_token: Optional[str]",
    "  password = self.connection.settings_dict['PASSWORD']",  # subscripts
    "    token = tokens[i]",
    "    secret := hashedSecret[n]",
    "    let secret = hmac::Key::new(algorithm, secret);",  # calls, paths
    "    generate_private_key: x25519_generate_private_key,",
    "    creds = oauth2client.Credentials",
    "    this.apiKey = apiKey;",
    "    auth_token=auth_token or self.auth_token,",
    "  x=i.accessToken&&(i.map.remove(),i.map=null)",  # minified
    "const FOO_AUTH = 0x0004;",  # 0x constants
    "#define SECRET_FLAG = 0x8803",
    "    access_token: OAuth access token for the user.",  # docstring field lists
    "    password: The password to use to connect to a resource.",
    'ErrCodeNoSuchEntity = "NoSuchEntity"; opChangePassword = "ChangePassword"',
    'TruncationToken: "IsTruncated",',  # names of other fields
    'expectedSessionToken: "SSO_SESSION_TOKEN",',
    'SecretAccessKey: "shared_config_secret",',
    'fmt := "ALTER USER %(user)s IDENTIFIED BY \\"%(password)s\\""',  # format strings
    'token = "{.access_token}"',
    "PWD=/home/agent/project",  # paths
    'credentials: "include"',  # fetch option
    'token: "AKID/19700101/us-east-1/es/aws4_request"',  # SigV4 scope
]


@pytest.mark.parametrize("text", CODE)
def test_code_is_not_a_credential(text: str) -> None:
    assert untouched(text), DEFAULT.redact_text(text).text


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("DB_PASSWORD=Sup3r-Secret!", "Sup3r-Secret!"),
        ('api_key = "Zf3D0LXCM3EIMbgJpUNnkRtOfOueHznB"', "Zf3D0LXCM3EIMbgJpUNnkRtOfOueHznB"),
        ("token: s.ZC9Ecf4M5g9o34Q6RkzGsj0z", "s.ZC9Ecf4M5g9o34Q6RkzGsj0z"),
        ('administrator_login_password = "thisIsDog11"', "thisIsDog11"),
        ("passwd: m{{h}o)p${e]nob(ody[finds>-_$#thisone}}`", "m{{h}o)p${e]nob(ody"),
        ("secrete := A,.:-@*?!x", "A,.:-@*?!x"),
        ('<add key="ClearTextPassword" value="TestSourcePassword" />', "TestSourcePassword"),
        ("curl -u developer:yqDVtkqPECriaLRi https://h/x", "yqDVtkqPECriaLRi"),
        ("SMTP_PASSWORD = Winter is coming 2024", "Winter is coming 2024"),
        ("Authorization: Basic YnJvd3Nlcjo=", "YnJvd3Nlcjo="),
    ],
)
def test_credentials_in_code_and_config_are_still_caught(text: str, secret: str) -> None:
    assert redacts(text, secret)


# --- 4: keywords inside words ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "--- PASS: TestCommandPassthrough/sub_case (0.00s)",
        "=== RUN   TestX\n--- PASS: TestX (0.01s)\nPASS\nok  \tgithub.com/x/y\t0.012s",
        "passthrough = Kx9-fQ2vLm",
        "compass: N3-W/42",
        "bypass_cache=Tr4e-ish",
        "echo PWD=$PWD; export PWD=/tmp/work",
    ],
)
def test_keywords_inside_words_do_not_fire(text: str) -> None:
    assert untouched(text), DEFAULT.redact_text(text).text


def test_password_keys_still_fire() -> None:
    assert redacts("DB_PASS=Kx9-fQ2vLm", "Kx9-fQ2vLm")
    assert redacts("pass: Kx9-fQ2vLm", "Kx9-fQ2vLm")
    assert redacts("pwd=Kx9-fQ2vLm", "Kx9-fQ2vLm")


# --- 5: paging, locking and idempotency tokens ---------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "aws dynamodb scan --next-page-token eyJ9a2V5IjogMX0K",
        "az storage blob lease --lock-token 7f3c9a2e-1b4d-4e8f-9a6c-2d5e8f1a3b7c",
        "aws ec2 run-instances --idempotency-token 8f14e45fceea167a5a36",
        '"input_token": "nextToken", "output_token": "NextToken"',
        "next_page_token = CiAKGjBpNDd2Nmp2Zml2cXRwYjBp",
        "idempotency_token: 1b4d-4e8f-9a6c-2d5e8f1a3b7c",
        "continuation_token=abc9-KX7",
    ],
)
def test_paging_locking_idempotency_tokens_are_not_credentials(text: str) -> None:
    assert untouched(text), DEFAULT.redact_text(text).text


def test_access_tokens_still_fire() -> None:
    assert redacts("--access-token Kx9fQ2vLm7Tz", "Kx9fQ2vLm7Tz")
    assert redacts("auth_token = 9f8e7d6c5b4a39281706f5e4", "9f8e7d6c5b4a39281706f5e4")


# --- 6: test vectors and image data ------------------------------------------------------


def test_documented_and_placeholder_values() -> None:
    for text in [
        'ExpectedAccessToken: "dGhpcyBpcyBub3QgYSByZWFsIHZhbHVl"',  # base64 of prose
        '"Token" : "AQoDY....=",',  # elided
        'const expectAuthToken = "Basic abc123"',
        'assert headers == {"Proxy-Authorization": "Basic dXNlcjpwYXNz"}',  # user:pass
        '"secret": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX-us2"',
        "http://user:pass%20pass@complex.url.com/path",
        "new OpenAI({ apiKey: 'My API Key' })",
    ]:
        assert untouched(text), DEFAULT.redact_text(text).text


PNG_DATA_URI = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+"
    "EAAZD0R1c2VyQWdlbnRFQUF5djQyMDEwMTIzNDU2Nzg5MEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFla/"
    "EAAAUvxj6eZxrNWcuz07esXpZwRqHFQgesZn8S00K703poQ31dPgL3WPNiFp5FxYz12+AAAA"
)


@pytest.mark.parametrize("profile", PROFILES)
def test_base64_image_data_is_not_a_token(profile: str) -> None:
    assert untouched(PNG_DATA_URI, profile), REDACTORS[profile].redact_text(PNG_DATA_URI).text
    notebook = {"outputs": [{"data": {"image/png": PNG_DATA_URI.split(",", 1)[1]}}]}
    assert unchanged_json(notebook, profile)


def test_meta_tokens_outside_base64_are_caught() -> None:
    token = "EAAB" + "x7Kd9Qe2" * 8
    assert redacts(f"FB_TOKEN={token}", token)
    assert redacts(f"https://graph.facebook.com/me?access_token={token}&x=1", token)


# --- 7: pii cards and IBANs; redaction is idempotent -------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "timestamp 1700000000000",
        "order 4000000000000002000",  # Visa prefix, 19 digits, Luhn-invalid
        "amex-like 37828224631000",  # Amex prefix, 14 digits
        "mixed 4111-1111 1111-1111",  # inconsistent separators
        "id 6011 1111 1111 111",  # Discover needs 16-19 digits
    ],
)
def test_pii_numbers_without_card_issuer_and_length_are_left(text: str) -> None:
    assert untouched(text, "pii")


def test_pii_cards_and_ibans_are_caught() -> None:
    assert redacts("card 4111 1111 1111 1111", "4111 1111 1111 1111", "pii")
    assert redacts("amex 3782 822463 10005", "3782 822463 10005", "pii")
    key = "AGE-SECRET-KEY-1PS7GV2SFZ8JUR9JSNCSZPJYR3JK7DXZHH7U4LHWQ8KFC89ZE8AFVUR3PXX"
    text = f"pay to GB82WEST12345698765432{key}"
    once = REDACTORS["pii"].redact_text(text)
    assert "GB82WEST" not in once.text and key not in once.text
    twice = REDACTORS["pii"].redact_text(once.text)
    assert twice.text == once.text and not twice.changed


def test_published_example_credentials_are_left_alone() -> None:
    for text in [
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        '"token": "ghu_16C7e42F292c6912E7710c838347Ae178B4a"',
        "Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
    ]:
        assert untouched(text), DEFAULT.redact_text(text).text
    assert redacts("aws_access_key_id = AKIAZ3MSJV4WJQ2B7HGF", "AKIAZ3MSJV4WJQ2B7HGF")


# --- 7: strict's quoted base64/hex --------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '"integrity": "sha512-v2kDEe57lecTulaDIuNTPy3Ry4gLGJ6Z1O3vE1krgXZNrsQ+LFTGHVxVjcXPs17"',
        'ETag: "6805f2cfc46c0f04559748bb039d69ae"',
        'checksum = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08aa"',
        'resolved "https://registry.npmjs.org/x/-/x-1.0.0.tgz#43fc912ef59a83054ea7f6706df4d53a7dea4d80"',
    ],
)
def test_strict_leaves_hashes_and_integrity_values(text: str) -> None:
    assert untouched(text, "strict"), REDACTORS["strict"].redact_text(text).text


def test_strict_still_flags_quoted_random_tokens() -> None:
    token = "I6FwzQZFL9l-44nviI1F04OTmorMaVQf9GS4Oe07qxL_vNkW6C"
    assert redacts(f'value = "{token}"', token, "strict")


def test_pii_diners_club_36_is_14_digits() -> None:
    assert untouched("fe: Element{84926274344903, 473620666599931, 365590438845504}", "pii")
    assert redacts("diners 3056 9309 0259 04", "3056 9309 0259 04", "pii")
