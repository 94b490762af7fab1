"""Named body patterns: the built-ins (written for this project) and how they count matches."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Mapping

import regex

from sluicegate.policy.decisions import ScanTimeout
from sluicegate.policy.views import BodyViews

# -- patterns -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A named body pattern; it is found when it matches at least `min_count` times.

    Built-ins also carry a cheap necessary condition (`anchors`: every match contains one of these
    lower-case literals; `prefilter`: every match contains a match of this `re` pattern), which
    skips hopeless regex scans without ever changing a result, and `max_len`, the longest match,
    so a stream rescans only that much already released text.
    """

    name: str
    regex: regex.Pattern[str]
    min_count: int = 1
    description: str = ""
    anchors: tuple[str, ...] = ()
    prefilter: re.Pattern[str] | None = None
    max_len: int | None = None

    def might_occur(self, text: str, needed: int = 1, lowered: str | None = None) -> bool:
        """False only if `text` cannot hold `needed` matches."""
        if self.anchors:
            low = text.lower() if lowered is None else lowered
            if needed == 1:
                if not any(a in low for a in self.anchors):
                    return False
            else:  # matches do not overlap, so each holds its own anchor occurrence
                hits = itertools.islice(self._anchor_re.finditer(low), needed)
                if sum(1 for _ in hits) < needed:
                    return False
        return self.prefilter is None or self.prefilter.search(text) is not None

    @functools.cached_property
    def _anchor_re(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(a) for a in self.anchors))

    def count(
        self,
        text: str,
        timeout: float | None,
        stop_at: int | None = None,
        lowered: str | None = None,
    ) -> int:
        """Matches in `text`. With `stop_at`, only whether the result reaches it is meaningful
        (it stops there, and is 0 when the prefilter shows it cannot be reached).
        Raises ScanTimeout past `timeout`."""
        if not self.might_occur(text, stop_at or 1, lowered):
            return 0
        n = 0
        try:
            for _ in self.regex.finditer(text, concurrent=True, timeout=timeout):
                n += 1
                if stop_at is not None and n >= stop_at:
                    break
        except TimeoutError:
            raise ScanTimeout(
                "policy_scan_timeout", f"pattern {self.name!r} exceeded the scan time budget"
            ) from None
        return n

    def found_in(self, body: BodyViews, timeout: float | None) -> bool:
        return any(
            self.count(view, timeout, self.min_count, body.lowered(i)) >= self.min_count
            for i, view in enumerate(body.views)
        )


def _compile(source: str) -> regex.Pattern[str]:
    return regex.compile(source)


def _builtin(
    name: str,
    source: str,
    description: str,
    *,
    anchors: tuple[str, ...] = (),
    prefilter: str | None = None,
    max_len: int,
    min_count: int = 1,
) -> Pattern:
    # ASCII semantics: case-insensitive parts fold ASCII letters only, so lower-case anchors
    # are a sound necessary condition.
    return Pattern(
        name,
        regex.compile(source, regex.ASCII),
        min_count,
        description,
        anchors=anchors,
        prefilter=re.compile(prefilter) if prefilter else None,
        max_len=max_len,
    )


# Written for this project from the formats themselves; tests/unit/test_policy.py has positive
# and negative examples for each. Every repetition is bounded and runs are anchored, so scans
# stay linear and matches have a known longest length.
_B64 = r"A-Za-z0-9+/"
_NAME = r"[\w.@-]{1,64}"
_PRIVILEGED_FILES = (
    rf"(?:/etc/(?:passwd|shadow|group|gshadow|sudoers|sudoers\.d/{_NAME}|crontab"
    rf"|cron\.d/{_NAME}|ld\.so\.preload|ssh/sshd_config|pam\.d/{_NAME}|profile\.d/{_NAME}"
    rf"|systemd/system/{_NAME})|(?:~|/root|/home/{_NAME})/\.ssh/authorized_keys)"
)
BUILTIN_PATTERNS: Mapping[str, Pattern] = {
    p.name: p
    for p in (
        _builtin(
            "private-key",
            r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY(?: BLOCK)?-----"
            r"|PuTTY-User-Key-File-[0-9]{1,3}:",
            "PEM/OpenSSH/PGP private key blocks and PuTTY key files.",
            anchors=("private key", "putty-user-key-file-"),
            max_len=128,
        ),
        _builtin(
            "bulk-credentials",
            r"(?i:(?:passw(?:or)?d|secret|api[_-]?key|access[_-]?key|auth[_-]?token"
            r"|private[_-]?key)[A-Za-z0-9_]{0,32}[\"']?"
            r"[ \t]{0,8}[:=][ \t]{0,8}[\"']?[^\s\"',;]{8,256})"
            r"|\bAKIA[0-9A-Z]{16}\b|\bsk-[A-Za-z0-9_-]{20,256}|\bgh[opsur]_[A-Za-z0-9]{30,256}"
            r"|\bxox[abprs]-[A-Za-z0-9-]{10,256}|\bglpat-[A-Za-z0-9_-]{20}",
            "Five or more credential assignments or well-known tokens "
            "(a dumped .env file, a credentials export).",
            anchors=(
                "passw",
                "secret",
                "api_key",
                "api-key",
                "apikey",
                "access_key",
                "access-key",
                "accesskey",
                "auth_token",
                "auth-token",
                "authtoken",
                "private_key",
                "private-key",
                "privatekey",
                "akia",
                "sk-",
                "ghp_",
                "gho_",
                "ghs_",
                "ghu_",
                "ghr_",
                "xoxa-",
                "xoxb-",
                "xoxp-",
                "xoxr-",
                "xoxs-",
                "glpat-",
            ),
            min_count=5,
            max_len=400,
        ),
        _builtin(
            "large-base64",
            rf"(?<![{_B64}])(?<!data:image/[a-z0-9.+-]{{1,32}};base64,)[{_B64}]{{4096}}",
            "A base64 run of 4096+ characters (about 3 KiB of binary), except "
            "inline images (data:image/...;base64,).",
            prefilter=rf"(?<![{_B64}])[{_B64}]{{4096}}",
            max_len=4096,
        ),
        _builtin(
            "pipe-to-shell",
            r"\b(?:curl|wget|fetch)\b[^\n|;&]{0,300}\|[ \t]{0,8}"
            r"(?:sudo[ \t]{1,8}(?:-[^\s|;&]{1,20}[ \t]{1,8}){0,5})?(?:ba|z|k|da|fi)?sh\b",
            "Downloading a script and piping it into a shell.",
            anchors=("curl", "wget", "fetch"),
            max_len=512,
        ),
        _builtin(
            "tls-verification-disabled",
            r"\bverify[ \t]{0,8}=[ \t]{0,8}False\b|\bcheck_hostname[ \t]{0,8}=[ \t]{0,8}False\b"
            r"|\bCERT_NONE\b|\b_create_unverified_context\b"
            r"|\bNODE_TLS_REJECT_UNAUTHORIZED[\"']?[ \t]{0,8}[=:][ \t]{0,8}[\"']?0"
            r"|\brejectUnauthorized[\"']?[ \t]{0,8}:[ \t]{0,8}false\b"
            r"|\bInsecureSkipVerify[ \t]{0,8}:[ \t]{0,8}true\b"
            r"|\bCURLOPT_SSL_VERIFY(?:PEER|HOST)[ \t]{0,8},[ \t]{0,8}(?:0|false)\b"
            r"|\bPYTHONHTTPSVERIFY[ \t]{0,8}=[ \t]{0,8}[\"']?0"
            r"|\bhttp\.sslVerify[ \t]{1,8}false\b|--no-check-certificate\b"
            r"|\bcurl\b[^\n|;&]{0,200}[ \t](?:--insecure\b|-[A-Za-z]{0,10}k[A-Za-z]{0,10}\b)",
            "Code or commands that turn off TLS certificate verification.",
            anchors=(
                "verify",
                "check_hostname",
                "cert_none",
                "_create_unverified_context",
                "node_tls_reject_unauthorized",
                "rejectunauthorized",
                "insecureskipverify",
                "curlopt_ssl_verify",
                "--no-check-certificate",
                "curl",
            ),
            max_len=256,
        ),
        _builtin(
            "privileged-file-write",
            rf"(?:>{{1,2}}[ \t]{{0,8}}|\btee[ \t]{{1,8}}(?:-a[ \t]{{1,8}})?){_PRIVILEGED_FILES}"
            rf"|\bopen\([ \t]{{0,8}}[\"']{_PRIVILEGED_FILES}[\"'][ \t]{{0,8}},[ \t]{{0,8}}"
            r"[\"'][wax+]|\bchmod[ \t]{1,8}(?:[ugoa]{0,4}\+s|[246][0-7]{3})\b",
            "Writing to system account, sudo, cron, PAM or SSH files, or setting "
            "setuid/setgid bits.",
            anchors=("/etc/", "authorized_keys", "chmod"),
            max_len=256,
        ),
    )
}
