"""Rule files -> a compiled, validated `RulePack`.

Rule files are strict YAML (`strict_yaml`: a duplicate key is an error, like an unknown key, a
bad regex or a duplicate id), and errors name the file and the key path (`rules[3].pattern`),
because a silently ignored typo in a redaction rule is a leak. Patterns may use named fragments
(`{{name}}`, defined under `fragments:` in any rule file). Verbose mode (`(?x)`) is refused.

At load time every rule's positive examples are streamed one character at a time and must come
out as whole-text redaction does (`redactor.check_stream_soundness`): a rule that differs could
release part of a secret in a stream. Whether a rule still catches its own examples is checked
by `python -m sluicegate rules test` (`redactor.check_rule_examples`), not at load time, so a
gateway never refuses to start over a rule that merely got weaker.

Pattern conventions (see rules/README.md):
- syntax of the `regex` module; a leading global flag group such as `(?i)` is allowed,
  backreferences are not;
- lookbehinds are bounded and look back at most `CONTEXT_CHARS` characters;
- every match starts at most `before` characters before or `after` characters after the start
  of an occurrence of one of the rule's keywords (`window: [before, after]`, default
  `DEFAULT_WINDOW`), or the rule has no keywords (then the pattern should start with a
  literal, which the regex engine finds fast on its own);
- with `followed_by`, only keyword occurrences followed right away by a match of that `re`
  pattern (always matched ignoring case) count, and the window is measured from the end of
  that match instead: a context rule (`password = ...`) then tries its pattern once, at the
  separator after the key, and not at every separator near every "password" in prose;
- a keyword in lowercase matches in any case; one with an uppercase letter matches exactly.
"""

from __future__ import annotations

import enum
import hashlib
import re
import string
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import yaml

from sluicegate import strict_yaml
from sluicegate.redaction import validators as validators_module

# How far back a rule may look (lookbehind, \b): the stream keeps this much released text.
CONTEXT_CHARS = 1024
# Where a match may start relative to a keyword occurrence (see the module docstring).
DEFAULT_WINDOW = (64, 96)
MAX_WINDOW = 1024

RULE_KEYS = frozenset(
    {"id", "description", "pattern", "group", "keywords", "followed_by", "window", "validators",
     "direction", "profiles", "examples"}
)  # fmt: skip
KEY_RULE_KEYS = frozenset(
    {"id", "description", "key", "value_validators", "direction", "profiles", "examples",
     "value_examples"}
)  # fmt: skip
FILE_KEYS = frozenset({"fragments", "rules", "key_rules"})
EXAMPLE_KEYS = frozenset({"positive", "negative"})
POSITIVE_KEYS = frozenset({"text", "secret"})

_ID = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_PROFILE = re.compile(r"^[a-z][a-z0-9_-]*$")
_LEADING_FLAGS = re.compile(r"^\(\?([aiLmsu]+)\)")
# Verbose mode anywhere (`(?x)`, `(?ix:`, `(?x-i)`): the first-character analysis and the
# lookbehind hardening read a pattern's spaces as literals, so verbose patterns are refused.
_VERBOSE_FLAG = re.compile(r"(?<!\\)\(\?[aiLmsuxV01-]*x[aiLmsuxV01-]*[:)]")
# `{{name}}`: a named fragment (see `fragments:`), expanded before compiling.
_FRAGMENT_REF = re.compile(r"(?<!\\)\{\{([a-z0-9]+(?:-[a-z0-9]+)*)\}\}")
MAX_FRAGMENT_DEPTH = 10
_BACKREFERENCE = re.compile(r"\\[1-9]|\\g<|\(\?P=|\\k<")
_FLAG_BITS = {
    "a": regex.ASCII, "i": regex.IGNORECASE, "L": regex.LOCALE, "m": regex.MULTILINE,
    "s": regex.DOTALL, "u": regex.UNICODE,
}  # fmt: skip


class Direction(enum.StrEnum):
    REQUEST = "request"
    RESPONSE = "response"


class RuleError(Exception):
    """Base of every rule loading/selection error."""


class RuleFileError(RuleError):
    """A rule file is unreadable or invalid; says where, never echoes matched data."""

    def __init__(self, file: Path | str, key_path: str, message: str) -> None:
        self.file = Path(file)
        self.key_path = key_path
        self.message = message
        location = f"{self.file}: {key_path}" if key_path else str(self.file)
        super().__init__(f"{location}: {message}")


class RuleSelectionError(RuleError):
    """`profile`, `enable` or `disable` names something no rule file defines."""


@dataclass(frozen=True)
class PositiveExample:
    text: str
    # The part that must not survive redaction; None: the rule must redact *something*.
    secret: str | None = None


@dataclass(frozen=True, eq=False)
class Rule:
    id: str
    description: str
    pattern: regex.Pattern[str]
    # The same pattern without the partial-matching workaround (see `harden_lookbehinds`):
    # faster, used where nothing is partial (whole-text redaction).
    plain: regex.Pattern[str]
    # `(?:pattern)(?!)`: never matches, only reports partial matches. Used to prove that a
    # match found in a truncated text cannot change when more text arrives.
    sentinel: regex.Pattern[str]
    # Characters a match can start with: a stream only runs rules that could start a match,
    # and a windowed search only tries positions holding one (`finder`, None: too many).
    first: FirstChars
    finder: re.Pattern[str] | None
    group: int | str
    keywords: tuple[str, ...]
    # What must follow a keyword occurrence for it to count (`re`, ignoring case); the window
    # is then measured from the end of this match.
    followed_by: re.Pattern[str] | None
    window: tuple[int, int]  # (before, after): where matches start around a keyword
    validators: tuple[validators_module.Validator, ...]
    directions: frozenset[Direction]
    profiles: frozenset[str]
    positives: tuple[PositiveExample, ...]
    negatives: tuple[str, ...]
    source: Path

    def applies_to(self, direction: Direction) -> bool:
        return direction in self.directions

    def accepts(self, candidate: str) -> bool:
        return all(check(candidate) for check in self.validators)


@dataclass(frozen=True, eq=False)
class KeyRule:
    """Masks the value of a structured field (JSON key, form field) whose name matches.

    The name says "credential"; `value_validators` say which values under it are one: a field
    named `cookie` in a dependency map holds a version range, a `token` field of an API spec a
    description or the name of another field. Whoever applies the rule masks a string value
    only when `accepts_value` says so (and never replaces a non-string value).
    """

    id: str
    description: str
    key: regex.Pattern[str]
    directions: frozenset[Direction]
    profiles: frozenset[str]
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    source: Path
    value_validators: tuple[validators_module.Validator, ...] = ()
    # Values the rule must mask / leave alone (checked by `rules test`).
    value_positives: tuple[str, ...] = ()
    value_negatives: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        return self.key.fullmatch(name) is not None

    def accepts_value(self, value: str) -> bool:
        """Whether a string value of a matching field is a credential to mask."""
        return bool(value) and all(check(value) for check in self.value_validators)

    def applies_to(self, direction: Direction) -> bool:
        return direction in self.directions


@dataclass(frozen=True)
class RuleSource:
    """One rule file as it was read: its path and its text (what a pack is rebuilt from)."""

    path: str
    text: str


@dataclass(frozen=True, eq=False)
class RuleSet:
    """Everything the rule files define, before profile selection."""

    rules: tuple[Rule, ...]
    key_rules: tuple[KeyRule, ...]
    files: tuple[Path, ...]
    # The files' texts as read, so another process can rebuild the identical set.
    sources: tuple[RuleSource, ...] = ()

    @property
    def every_rule(self) -> tuple[Rule | KeyRule, ...]:
        return (*self.rules, *self.key_rules)

    @property
    def profiles(self) -> frozenset[str]:
        found: set[str] = set()
        for rule in self.every_rule:
            found |= rule.profiles
        return frozenset(found)


@dataclass(frozen=True, eq=False)
class RulePack:
    """The enabled rules of one profile, in file order (which also breaks tag ties)."""

    rules: tuple[Rule, ...]
    key_rules: tuple[KeyRule, ...]
    profile: str
    # Per-direction compiled helpers, built lazily by the redactor.
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    # What the pack was selected from (`pack_from_sources` rebuilds it in another process):
    # the rule files' texts and the selection.
    sources: tuple[RuleSource, ...] = ()
    enable: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """SHA-256 of what the compiled pack does: every rule's id, pattern, flags, keywords,
        window, validators, directions, key rules. Two processes that built packs with the same
        fingerprint redact alike (the parent and an offload worker check it)."""
        cached = self.cache.get(_FINGERPRINT)
        if isinstance(cached, str):
            return cached
        digest = hashlib.sha256(self.profile.encode())
        for rule in self.rules:
            _feed(
                digest,
                "rule", rule.id, rule.pattern.pattern, rule.pattern.flags, rule.plain.pattern,
                rule.group, rule.keywords,
                rule.followed_by.pattern if rule.followed_by is not None else None,
                rule.window, [_validator_name(v) for v in rule.validators],
                sorted(rule.directions), sorted(rule.first.ascii), rule.first.non_ascii,
            )  # fmt: skip
        for key_rule in self.key_rules:
            _feed(
                digest,
                "key", key_rule.id, key_rule.key.pattern, key_rule.key.flags,
                sorted(key_rule.directions),
                [_validator_name(v) for v in key_rule.value_validators],
            )  # fmt: skip
        value = digest.hexdigest()
        self.cache[_FINGERPRINT] = value
        return value

    def rules_for(self, direction: Direction) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.applies_to(direction))

    def key_rules_for(self, direction: Direction) -> tuple[KeyRule, ...]:
        return tuple(rule for rule in self.key_rules if rule.applies_to(direction))


_FINGERPRINT = "rules.fingerprint"


def _validator_name(check: object) -> str:
    """A validator's stable name (module-level functions, or `functools.partial` of one)."""
    func = getattr(check, "func", None)
    if func is not None:
        args = getattr(check, "args", ())
        keywords = sorted(getattr(check, "keywords", {}).items())
        return f"{_validator_name(func)}{args!r}{keywords!r}"
    return f"{getattr(check, '__module__', '')}.{getattr(check, '__name__', repr(check))}"


def _feed(digest: Any, *parts: object) -> None:
    digest.update(repr(parts).encode("utf-8", "surrogatepass"))
    digest.update(b"\0")


def rule_files(paths: Sequence[Path]) -> list[Path]:
    """Files given as such, directories expanded to their sorted `*.yaml`/`*.yml`."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        elif path.is_file():
            files.append(path)
        else:
            raise RuleFileError(path, "", "no such file or directory")
    if not files:
        raise RuleFileError(Path(paths[0]) if paths else Path("."), "", "no rule files found")
    return files


def load_rule_set(paths: Sequence[Path], *, check_streams: bool = True) -> RuleSet:
    """Load and validate every rule file (in name order).

    Fragments (`fragments:` in any file) are shared by all files. With `check_streams`, every
    rule's positive examples are also streamed one character at a time and must come out as
    whole-text redaction does (a rule that differs could release part of a secret in a stream):
    a rule that fails is a load error.
    """
    sources = tuple(RuleSource(str(file), _read_text(file)) for file in rule_files(paths))
    return rule_set_from_sources(sources, check_streams=check_streams)


def rule_set_from_sources(sources: Sequence[RuleSource], *, check_streams: bool = True) -> RuleSet:
    """`load_rule_set` of rule files already read (`RuleSet.sources` of another process)."""
    if not sources:
        raise RuleFileError(Path("."), "", "no rule files found")
    files = [Path(source.path) for source in sources]
    documents = [(file, _parse_yaml(file, s.text)) for file, s in zip(files, sources, strict=True)]
    fragments = _collect_fragments(documents)
    rules: list[Rule] = []
    key_rules: list[KeyRule] = []
    seen: dict[str, Path] = {}
    for file, data in documents:
        file_rules, file_key_rules = _parse_file(file, data, fragments)
        file_items: tuple[Rule | KeyRule, ...] = (*file_rules, *file_key_rules)
        for index, item in enumerate(file_items):
            if item.id in seen:
                section = "rules" if index < len(file_rules) else "key_rules"
                position = index if index < len(file_rules) else index - len(file_rules)
                raise RuleFileError(
                    file, f"{section}[{position}].id",
                    f"duplicate id {item.id!r} (first defined in {seen[item.id]})",
                )  # fmt: skip
            seen[item.id] = file
        rules += file_rules
        key_rules += file_key_rules
    rule_set = RuleSet(tuple(rules), tuple(key_rules), tuple(files), tuple(sources))
    if check_streams:
        _check_streams(rule_set)
    return rule_set


# Rules already found sound, by everything the check depends on (loads repeat in one process).
_SOUND: set[tuple[object, ...]] = set()


def _soundness_key(rule: Rule) -> tuple[object, ...]:
    checks = tuple(getattr(v, "__name__", repr(v)) for v in rule.validators)
    return (
        rule.pattern.pattern,
        rule.pattern.flags,
        rule.first,
        rule.group,
        checks,
        rule.positives,
    )


# The stream-soundness check (`redactor.check_stream_soundness`): the redactor builds on this
# module, so it registers the check here when it is imported, which importing any module of
# the `sluicegate.redaction` package does (see its __init__).
StreamCheck = Callable[["Rule"], Sequence[Any]]
_stream_check: StreamCheck | None = None


def use_stream_check(check: StreamCheck) -> None:
    global _stream_check
    _stream_check = check


def _check_streams(rule_set: RuleSet) -> None:
    check_stream_soundness = _stream_check
    if check_stream_soundness is None:
        raise RuleError("the stream soundness check is not registered")
    for rule in rule_set.rules:
        key = _soundness_key(rule)
        if key in _SOUND:
            continue
        failures = check_stream_soundness(rule)
        if not failures:
            _SOUND.add(key)
            continue
        first = failures[0]
        index = rule_set.rules.index(rule)
        position = sum(1 for r in rule_set.rules[:index] if r.source == rule.source)
        raise RuleFileError(
            rule.source, f"rules[{position}].{first.example}", f"{rule.id}: {first.problem}"
        )


def select(
    rule_set: RuleSet,
    profile: str = "default",
    *,
    enable: Collection[str] = (),
    disable: Collection[str] = (),
) -> RulePack:
    """Rules of `profile`, plus `enable`, minus `disable` (ids)."""
    known = {rule.id for rule in rule_set.every_rule}
    unknown = sorted((set(enable) | set(disable)) - known)
    if unknown:
        raise RuleSelectionError(f"unknown rule id(s): {', '.join(unknown)}")
    if profile not in rule_set.profiles:
        available = ", ".join(sorted(rule_set.profiles)) or "none"
        raise RuleSelectionError(f"unknown profile {profile!r} (available: {available})")

    def chosen(rule: Rule | KeyRule) -> bool:
        return (profile in rule.profiles or rule.id in enable) and rule.id not in disable

    return RulePack(
        rules=tuple(r for r in rule_set.rules if chosen(r)),
        key_rules=tuple(r for r in rule_set.key_rules if chosen(r)),
        profile=profile,
        sources=rule_set.sources,
        enable=tuple(enable),
        disable=tuple(disable),
    )


def load_rule_pack(
    paths: Sequence[Path],
    profile: str = "default",
    *,
    enable: Collection[str] = (),
    disable: Collection[str] = (),
) -> RulePack:
    return select(load_rule_set(paths), profile, enable=enable, disable=disable)


def pack_from_sources(
    sources: Sequence[RuleSource],
    profile: str,
    *,
    enable: Collection[str] = (),
    disable: Collection[str] = (),
    check_streams: bool = False,
) -> RulePack:
    """The pack `load_rule_pack` made of these rule files' texts, rebuilt without reading any
    file (an offload worker; the stream check already passed where the texts were read)."""
    rule_set = rule_set_from_sources(sources, check_streams=check_streams)
    return select(rule_set, profile, enable=enable, disable=disable)


# --- parsing ---------------------------------------------------------------------------


class _Reader:
    """Typed access to one YAML mapping that reports errors with the key path."""

    def __init__(self, file: Path, path: str, data: object, allowed: frozenset[str]) -> None:
        if not isinstance(data, dict):
            raise RuleFileError(file, path, f"expected a mapping, got {_kind(data)}")
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise RuleFileError(
                file, path, f"unknown key(s): {', '.join(unknown)} (allowed: {_names(allowed)})"
            )
        self.file, self.path, self.data = file, path, data

    def error(self, key: str, message: str) -> RuleFileError:
        return RuleFileError(self.file, f"{self.path}.{key}" if self.path else key, message)

    def string(self, key: str, *, required: bool = True, default: str = "") -> str:
        value = self.data.get(key, None)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"expected a non-empty string, got {_kind(value)}")
        return value

    def strings(self, key: str, *, required: bool = False) -> list[str]:
        value = self.data.get(key, None)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_kind(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str) or not item:
                raise self.error(
                    f"{key}[{index}]", f"expected a non-empty string, got {_kind(item)}"
                )
        return value


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _names(keys: Iterable[str]) -> str:
    return ", ".join(sorted(keys))


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(file, "", f"cannot read: {exc.__class__.__name__}") from None


def _parse_yaml(file: Path, text: str) -> object:
    try:
        return strict_yaml.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        detail = f": {problem}" if isinstance(problem, str) and "duplicate" in problem else ""
        raise RuleFileError(file, "", f"invalid YAML{where}{detail}") from None


def _collect_fragments(documents: list[tuple[Path, object]]) -> dict[str, str]:
    """Every file's `fragments:` (name -> pattern text), expanded; names are unique."""
    raw: dict[str, tuple[Path, str]] = {}
    for file, data in documents:
        if data is None:
            continue
        top = _Reader(file, "", data, FILE_KEYS)
        section = top.data.get("fragments", None)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise top.error("fragments", f"expected a mapping, got {_kind(section)}")
        for name, text in section.items():
            where = f"fragments.{name}"
            if not isinstance(name, str) or not _ID.match(name):
                raise RuleFileError(file, where, "a fragment name is kebab-case")
            if not isinstance(text, str) or not text:
                raise RuleFileError(file, where, f"expected a pattern, got {_kind(text)}")
            if name in raw:
                first = raw[name][0]
                raise RuleFileError(file, where, f"duplicate fragment (first defined in {first})")
            raw[name] = (file, text)
    expanded: dict[str, str] = {}
    for name, (file, text) in raw.items():
        try:
            expanded[name] = _expand(text, {n: t for n, (_, t) in raw.items()}, (name,))
        except ValueError as exc:
            raise RuleFileError(file, f"fragments.{name}", str(exc)) from None
        try:
            regex.compile(expanded[name])
        except regex.error as exc:
            raise RuleFileError(file, f"fragments.{name}", f"invalid pattern: {exc}") from None
    return expanded


def _expand(text: str, fragments: dict[str, str], stack: tuple[str, ...] = ()) -> str:
    """`text` with every `{{name}}` replaced by that fragment (expanded in turn)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fragments:
            raise ValueError(f"unknown fragment {{{{{name}}}}}")
        if name in stack:
            raise ValueError(f"fragment cycle: {' -> '.join((*stack, name))}")
        if len(stack) >= MAX_FRAGMENT_DEPTH:
            raise ValueError("fragments nested too deeply")
        return _expand(fragments[name], fragments, (*stack, name))

    return _FRAGMENT_REF.sub(replace, text)


def _parse_file(
    file: Path, data: object, fragments: dict[str, str]
) -> tuple[list[Rule], list[KeyRule]]:
    if data is None:
        return [], []
    top = _Reader(file, "", data, FILE_KEYS)
    rules_data = top.data.get("rules", None) or []
    key_rules_data = top.data.get("key_rules", None) or []
    for key, section in (("rules", rules_data), ("key_rules", key_rules_data)):
        if not isinstance(section, list):
            raise top.error(key, f"expected a list, got {_kind(section)}")
    rules = [_parse_rule(file, f"rules[{i}]", item, fragments) for i, item in enumerate(rules_data)]
    key_rules = [
        _parse_key_rule(file, f"key_rules[{i}]", item, fragments)
        for i, item in enumerate(key_rules_data)
    ]
    return rules, key_rules


def _common(reader: _Reader) -> tuple[str, str, frozenset[Direction], frozenset[str]]:
    rule_id = reader.string("id")
    if not _ID.match(rule_id):
        raise reader.error("id", f"{rule_id!r} is not kebab-case ([a-z0-9] words joined by -)")
    description = reader.string("description")
    direction = reader.string("direction", required=False, default="both")
    if direction not in ("request", "response", "both"):
        raise reader.error("direction", "expected request, response or both")
    directions = frozenset(Direction) if direction == "both" else frozenset({Direction(direction)})
    profiles = reader.strings("profiles", required=True)
    if not profiles:
        raise reader.error("profiles", "needs at least one profile")
    for index, profile in enumerate(profiles):
        if not _PROFILE.match(profile):
            raise reader.error(f"profiles[{index}]", f"{profile!r} is not a valid profile name")
    return rule_id, description, directions, frozenset(profiles)


_NOOP = r"(?<=[\s\S])"  # always true right after a literal character
_QUANTIFIER = re.compile(r"[*+?]|\{\d*(?:,\d*)?\}")
_ESCAPE_LITERAL = set("nrtfva0")
_ESCAPE_SKIP = {"x": 2, "u": 4, "U": 8}


def _tokens(source: str) -> list[tuple[str, str]]:
    """Split a pattern into (kind, text): lit, atom, quant, open:<kind>, close, alt."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(source)
    while i < n:
        char = source[i]
        if char == "\\":
            nxt = source[i + 1 : i + 2]
            if nxt in _ESCAPE_SKIP:
                end = i + 2 + _ESCAPE_SKIP[nxt]
            elif nxt in ("N", "p", "P", "g", "k") and source[i + 2 : i + 3] in ("{", "<"):
                end = source.index("}" if source[i + 2] == "{" else ">", i) + 1
            else:
                end = i + 2
            literal = not nxt.isalnum() or nxt in _ESCAPE_LITERAL or nxt in _ESCAPE_SKIP
            tokens.append(("lit" if literal else "atom", source[i:end]))
            i = end
        elif char == "[":
            j = i + 1
            if source[j : j + 1] == "^":
                j += 1
            if source[j : j + 1] == "]":
                j += 1
            while j < n and source[j] != "]":
                j += 2 if source[j] == "\\" else 1
            tokens.append(("atom", source[i : j + 1]))
            i = j + 1
        elif char == "(":
            if source.startswith("(?#", i):
                end = source.index(")", i) + 1
                i = end
                continue
            kind = "lookbehind" if source.startswith(("(?<=", "(?<!"), i) else "group"
            match = re.match(r"\((?:\?(?:<[=!]|P?<\w+>|[=!:>|]|[aiLmsux-]*:?))?", source[i:])
            end = i + len(match.group()) if match else i + 1
            tokens.append((f"open:{kind}", source[i:end]))
            i = end
        elif char == ")":
            tokens.append(("close", char))
            i += 1
        elif char == "|":
            tokens.append(("alt", char))
            i += 1
        elif (quantifier := _QUANTIFIER.match(source, i)) is not None:
            end = quantifier.end()
            if source[end : end + 1] in ("?", "+"):
                end += 1
            tokens.append(("quant", source[i:end]))
            i = end
        elif char in ".^$":
            tokens.append(("atom", char))
            i += 1
        else:
            tokens.append(("lit", char))
            i += 1
    return tokens


def harden_lookbehinds(source: str) -> str:
    """Work around a partial-matching bug of the `regex` module.

    Inside a lookbehind, a run of literal characters followed by more pattern makes
    `search(..., partial=True)` report partial matches that can never complete (a stream
    would hold text back forever). A no-op assertion after each such run avoids it without
    changing what the pattern matches.
    """
    tokens = _tokens(source)
    out: list[str] = []
    stack: list[str] = []
    run = 0
    for index, (kind, text) in enumerate(tokens):
        quantified = index + 1 < len(tokens) and tokens[index + 1][0] == "quant"
        in_lookbehind = "lookbehind" in stack
        if kind == "lit" and not quantified:
            run += 1
            out.append(text)
            following = tokens[index + 1] if index + 1 < len(tokens) else ("end", "")
            ends = following[0] != "lit" or (
                index + 2 < len(tokens) and tokens[index + 2][0] == "quant"
            )
            if in_lookbehind and ends and run >= 2:
                out.append(_NOOP)
            if ends:
                run = 0
            continue
        run = 0
        if kind.startswith("open:"):
            stack.append(kind[5:])
        elif kind == "close" and stack:
            stack.pop()
        out.append(text)
    return "".join(out)


# --- first characters -------------------------------------------------------------------
# A stream only runs the rules that can start a match at one of the characters it received,
# so each rule knows the characters its matches can start with (computed from the pattern).

_ANY_ASCII = frozenset(map(chr, range(128)))
_WORD_ASCII = frozenset(string.ascii_letters + string.digits + "_")
_SPACE_ASCII = frozenset(" \t\n\r\f\v")
_CLASS_ESCAPES = {"d": frozenset(string.digits), "w": _WORD_ASCII, "s": _SPACE_ASCII}
_ZERO_WIDTH_ESCAPES = set("bBAZzGmM")
_CHAR_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}


@dataclass(frozen=True)
class FirstChars:
    """Characters a match can start with: some ASCII ones, and maybe any non-ASCII one."""

    ascii: frozenset[str]
    non_ascii: bool

    @classmethod
    def anything(cls) -> FirstChars:
        return cls(_ANY_ASCII, True)

    def __or__(self, other: FirstChars) -> FirstChars:
        return FirstChars(self.ascii | other.ascii, self.non_ascii or other.non_ascii)

    def accepts(self, char: str) -> bool:
        return char in self.ascii if char < "\x80" else self.non_ascii

    def finder(self) -> re.Pattern[str] | None:
        """A regex finding positions that may start a match; None when that is most."""
        if len(self.ascii) > 8:
            return None
        chars = "".join(sorted(self.ascii))
        body = f"[{re.escape(chars)}]" if chars else ""
        if self.non_ascii:
            body = f"{body}|[^\\x00-\\x7f]" if body else "[^\\x00-\\x7f]"
        return re.compile(body) if body else None


_EMPTY = FirstChars(frozenset(), False)


def _escape_chars(escape: str, ignorecase: bool) -> tuple[FirstChars, bool] | None:
    """(first chars, zero-width) of one escape token; None if it is a literal character."""
    letter = escape[1:2]
    if letter in _ZERO_WIDTH_ESCAPES:
        return _EMPTY, True
    if letter in _CLASS_ESCAPES:
        return FirstChars(_CLASS_ESCAPES[letter], letter != "d"), False
    if letter.isalpha() and letter not in _CHAR_ESCAPES and letter not in "xuU":
        return FirstChars.anything(), False  # \D \W \S \p{..} \N{..}: be generous
    return None


def _literal_char(token: str) -> str:
    if not token.startswith("\\"):
        return token
    letter = token[1]
    if letter in _CHAR_ESCAPES:
        return _CHAR_ESCAPES[letter]
    if letter in "xuU":
        return chr(int(token[2:], 16))
    return letter


def _with_case(chars: set[str], ignorecase: bool) -> FirstChars:
    if ignorecase:
        chars = chars | {c.lower() for c in chars} | {c.upper() for c in chars}
    ascii_chars = frozenset(c for c in chars if c < "\x80")
    return FirstChars(ascii_chars, len(ascii_chars) < len(chars) or ignorecase)


def _class_chars(token: str, ignorecase: bool) -> FirstChars:
    body = token[1:-1]
    if body.startswith("^"):
        return FirstChars.anything()
    chars: set[str] = set()
    result, i = _EMPTY, 0
    while i < len(body):
        if body[i] == "\\":
            size = 2 + {"x": 2, "u": 4, "U": 8}.get(body[i + 1 : i + 2], 0)
            escape = body[i : i + size]
            special = _escape_chars(escape, ignorecase)
            if special is not None:
                result |= special[0]
                i += size
                continue
            char, i = _literal_char(escape), i + size
        elif body[i] == "[":
            return FirstChars.anything()  # POSIX or nested sets: be generous
        else:
            char, i = body[i], i + 1
        if body[i : i + 1] == "-" and i + 1 < len(body):
            high = body[i + 1]
            if high == "\\":
                size = 2 + {"x": 2, "u": 4, "U": 8}.get(body[i + 2 : i + 3], 0)
                high, step = _literal_char(body[i + 1 : i + 1 + size]), 1 + size
            else:
                step = 2
            chars.update(chr(c) for c in range(ord(char), ord(high) + 1))
            i += step
        else:
            chars.add(char)
    return result | _with_case(chars, ignorecase)


def first_chars(source: str, ignorecase: bool = False) -> FirstChars:
    """The characters any match of `source` can start with (a superset), never too few."""
    try:
        tokens = _tokens(source)
        first, nullable, _ = _first_of_alternation(tokens, 0, ignorecase)
    except (ValueError, IndexError):
        return FirstChars.anything()
    return FirstChars.anything() if nullable else first


def _first_of_alternation(
    tokens: list[tuple[str, str]], i: int, ignorecase: bool
) -> tuple[FirstChars, bool, int]:
    """FIRST and nullability of `seq | seq | ...` starting at token i, up to a close."""
    first, nullable = _EMPTY, False
    while True:
        seq_first, seq_nullable, i = _first_of_sequence(tokens, i, ignorecase)
        first, nullable = first | seq_first, nullable or seq_nullable
        if i < len(tokens) and tokens[i][0] == "alt":
            i += 1
            continue
        return first, nullable, i


def _first_of_sequence(
    tokens: list[tuple[str, str]], i: int, ignorecase: bool
) -> tuple[FirstChars, bool, int]:
    first, nullable = _EMPTY, True
    while i < len(tokens) and tokens[i][0] not in ("alt", "close"):
        kind, text = tokens[i]
        if kind.startswith("open:"):
            inner_case = ignorecase
            flags = re.match(r"\(\?([aiLmsux]*)(?:-([aiLmsux]*))?:", text)
            if flags:
                inner_case = ("i" in flags.group(1) or ignorecase) and "i" not in (
                    flags.group(2) or ""
                )
            item, item_nullable, i = _first_of_alternation(tokens, i + 1, inner_case)
            if i >= len(tokens) or tokens[i][0] != "close":
                raise ValueError("unbalanced group")
            if kind == "open:lookbehind" or text in ("(?=", "(?!"):
                item, item_nullable = _EMPTY, True  # zero-width
            i += 1
        elif kind == "lit":
            item, item_nullable, i = _with_case({_literal_char(text)}, ignorecase), False, i + 1
        elif kind == "atom":
            if text in ("^", "$"):
                item, item_nullable = _EMPTY, True
            elif text == ".":
                item, item_nullable = FirstChars.anything(), False
            elif text.startswith("["):
                item, item_nullable = _class_chars(text, ignorecase), False
            else:
                special = _escape_chars(text, ignorecase) or (FirstChars.anything(), False)
                item, item_nullable = special
            i += 1
        else:  # a quantifier without an atom: be generous
            raise ValueError("unexpected token")
        if i < len(tokens) and tokens[i][0] == "quant":
            quantifier = tokens[i][1]
            if quantifier[0] in "*?" or re.match(r"\{0*(?:,|\})|\{,", quantifier):
                item_nullable = True
            i += 1
        if nullable:
            first = first | item
            nullable = item_nullable
    return first, nullable, i


def literal_prefixes(source: str, limit: int = 4) -> frozenset[str] | None:
    """Literal strings (2 to `limit` characters, case-sensitive) one of which every match of
    `source` starts with, when the pattern says so plainly: leading lookarounds, then
    literal characters, or a group of alternatives that each start so. None otherwise.

    A stream uses them to skip a rule whose first character arrived without the rest of
    its prefix (`re_` for every `r`): the first-character test is too coarse for prefixes
    made of common letters."""
    if _LEADING_FLAGS.match(source):
        return None
    try:
        tokens = _tokens(source)
        prefixes, _ = _prefixes_of_alternation(tokens, 0, limit)
    except (ValueError, IndexError):
        return None
    if not prefixes or any(len(p) < 2 for p in prefixes):
        return None
    return frozenset(prefixes)


def _prefixes_of_alternation(
    tokens: list[tuple[str, str]], i: int, limit: int
) -> tuple[set[str], int]:
    """Prefixes of `seq | seq ...` from token i up to its close (raises ValueError when one
    alternative has no literal prefix)."""
    result: set[str] = set()
    while True:
        prefix, i = _prefix_of_sequence(tokens, i, limit)
        result |= prefix
        if i < len(tokens) and tokens[i][0] == "alt":
            i += 1
            continue
        return result, i


def _skip_group(tokens: list[tuple[str, str]], i: int) -> int:
    """The index after the close of the group opened at token i."""
    depth = 0
    while i < len(tokens):
        kind = tokens[i][0]
        depth += kind.startswith("open:")
        depth -= kind == "close"
        i += 1
        if depth == 0:
            return i
    raise ValueError("unbalanced group")


def _prefix_of_sequence(tokens: list[tuple[str, str]], i: int, limit: int) -> tuple[set[str], int]:
    """The literal prefixes of one alternative; the index of its end (alt or close)."""
    prefixes = {""}
    open_ended = True  # still adding characters to every prefix
    while i < len(tokens) and tokens[i][0] not in ("alt", "close"):
        kind, text = tokens[i]
        quantified = i + 1 < len(tokens) and tokens[i + 1][0] == "quant"
        if kind == "open:lookbehind" or text in ("(?=", "(?!"):
            i = _skip_group(tokens, i)  # zero-width
            if i < len(tokens) and tokens[i][0] == "quant":
                raise ValueError("quantified lookaround")
            continue
        if not open_ended:
            i = _skip_group(tokens, i) if kind.startswith("open:") else i + 1
            if i < len(tokens) and tokens[i][0] == "quant":
                i += 1
            continue
        if kind == "lit" and not quantified:
            prefixes = {p + _literal_char(text) for p in prefixes}
            i += 1
        elif kind.startswith("open:") and text in ("(", "(?:") and not _group_quantified(tokens, i):
            inner, j = _prefixes_of_alternation(tokens, i + 1, limit)
            if j >= len(tokens) or tokens[j][0] != "close":
                raise ValueError("unbalanced group")
            prefixes = {p + q for p in prefixes for q in inner}
            i = j + 1
            open_ended = all(len(p) < limit for p in prefixes) and len(prefixes) <= 64
            continue
        else:
            open_ended = False
            continue
        if any(len(p) >= limit for p in prefixes):
            open_ended = False
    if not all(prefixes) or "" in prefixes:
        raise ValueError("an alternative has no literal prefix")
    return {p[:limit] for p in prefixes}, i


def _group_quantified(tokens: list[tuple[str, str]], i: int) -> bool:
    end = _skip_group(tokens, i)
    return end < len(tokens) and tokens[end][0] == "quant"


def compile_pattern(
    source: str,
) -> tuple[regex.Pattern[str], regex.Pattern[str], FirstChars]:
    """Compile a rule pattern (for partial and for plain matching) and compute the
    characters its matches can start with.

    Raises `regex.error` or `ValueError` (the caller adds the file and key path).
    """
    if _BACKREFERENCE.search(source):
        raise ValueError("backreferences are not supported")
    flags_match = _LEADING_FLAGS.match(source)
    letters = flags_match.group(1) if flags_match else ""
    plain_body = source[flags_match.end() :] if flags_match else source
    body = harden_lookbehinds(plain_body)
    flags = 0
    for letter in letters:
        flags |= _FLAG_BITS[letter]
    pattern = regex.compile(body, flags)
    plain = regex.compile(plain_body, flags)
    if plain.search("") is not None:
        raise ValueError("pattern matches the empty string")
    return pattern, plain, first_chars(body, ignorecase="i" in letters)


def _pattern_text(reader: _Reader, key: str, fragments: dict[str, str]) -> str:
    """The pattern at `key` with its fragments expanded; verbose mode is refused."""
    try:
        source = _expand(reader.string(key), fragments)
    except ValueError as exc:
        raise reader.error(key, str(exc)) from None
    if _VERBOSE_FLAG.search(source):
        raise reader.error(key, "verbose mode (?x) is not supported: write spaces as \\x20 or [ ]")
    return source


def _parse_rule(file: Path, path: str, data: object, fragments: dict[str, str]) -> Rule:
    reader = _Reader(file, path, data, RULE_KEYS)
    rule_id, description, directions, profiles = _common(reader)
    source = _pattern_text(reader, "pattern", fragments)
    try:
        pattern, plain, first = compile_pattern(source)
        sentinel = regex.compile(f"(?:{pattern.pattern})(?!)", pattern.flags)
    except (regex.error, ValueError) as exc:
        raise reader.error("pattern", f"invalid pattern: {exc}") from None

    group: int | str = 0
    raw_group = reader.data.get("group", None)
    if raw_group is not None:
        if isinstance(raw_group, bool) or not isinstance(raw_group, int | str):
            raise reader.error("group", f"expected a group number or name, got {_kind(raw_group)}")
        exists = (
            0 <= raw_group <= pattern.groups
            if isinstance(raw_group, int)
            else raw_group in pattern.groupindex
        )
        if not exists:
            raise reader.error("group", f"the pattern has no group {raw_group!r}")
        group = raw_group

    keywords = tuple(reader.strings("keywords"))
    followed_by: re.Pattern[str] | None = None
    if reader.data.get("followed_by", None) is not None:
        follow_source = _pattern_text(reader, "followed_by", fragments)
        if not keywords:
            raise reader.error("followed_by", "needs keywords")
        # It is embedded in the keyword index's patterns, next to other rules' follows.
        if _BACKREFERENCE.search(follow_source) or "(?P<" in follow_source:
            raise reader.error("followed_by", "backreferences and named groups not supported")
        try:
            re.compile(f"(?:{follow_source})")
            followed_by = re.compile(follow_source)
        except re.error as exc:
            raise reader.error("followed_by", f"invalid pattern: {exc}") from None
    window = DEFAULT_WINDOW
    raw_window = reader.data.get("window", None)
    if raw_window is not None:
        valid = (
            isinstance(raw_window, list)
            and len(raw_window) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in raw_window)
            and all(0 <= n <= MAX_WINDOW for n in raw_window)
        )
        if not valid:
            raise reader.error("window", f"expected [before, after], 0 to {MAX_WINDOW} each")
        if not keywords:
            raise reader.error("window", "a window needs keywords")
        window = (raw_window[0], raw_window[1])

    return Rule(
        id=rule_id,
        description=description,
        pattern=pattern,
        plain=plain,
        sentinel=sentinel,
        first=first,
        finder=first.finder(),
        group=group,
        keywords=keywords,
        followed_by=followed_by,
        window=window,
        validators=_parse_validators(reader, "validators"),
        directions=directions,
        profiles=profiles,
        positives=_parse_positives(reader),
        negatives=tuple(_parse_examples(reader)[1]),
        source=file,
    )


def _parse_validators(reader: _Reader, section: str) -> tuple[validators_module.Validator, ...]:
    raw = reader.data.get(section, None)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise reader.error(section, f"expected a list, got {_kind(raw)}")
    result: list[validators_module.Validator] = []
    for index, item in enumerate(raw):
        key = f"{section}[{index}]"
        name, argument = item, None
        if isinstance(item, dict):
            if len(item) != 1:
                raise reader.error(key, "expected a single `name: argument` pair")
            ((name, argument),) = item.items()
        if not isinstance(name, str) or name not in validators_module.REGISTRY:
            known = _names(validators_module.REGISTRY)
            raise reader.error(key, f"unknown validator {name!r} (known: {known})")
        expected = validators_module.ARGUMENT_TYPES.get(name)
        if expected is None and argument is not None:
            raise reader.error(key, f"validator {name!r} takes no argument")
        if expected is not None:
            valid = isinstance(argument, int | float) and not isinstance(argument, bool)
            if not valid or (expected is int and not isinstance(argument, int)):
                raise reader.error(key, f"validator {name!r} needs a {expected.__name__} argument")
        result.append(validators_module.REGISTRY[name](argument))
    return tuple(result)


def _parse_examples(reader: _Reader) -> tuple[list[object], list[str]]:
    raw = reader.data.get("examples", None)
    if raw is None:
        raise reader.error("examples", "is required (positive examples at least)")
    examples = _Reader(reader.file, f"{reader.path}.examples", raw, EXAMPLE_KEYS)
    positive = raw.get("positive", None)
    if not isinstance(positive, list) or not positive:
        raise examples.error("positive", "needs a non-empty list")
    return positive, examples.strings("negative")


def _parse_positives(reader: _Reader) -> tuple[PositiveExample, ...]:
    positives, _ = _parse_examples(reader)
    result: list[PositiveExample] = []
    for index, item in enumerate(positives):
        path = f"{reader.path}.examples.positive[{index}]"
        if isinstance(item, str) and item:
            result.append(PositiveExample(item))
            continue
        example = _Reader(reader.file, path, item, POSITIVE_KEYS)
        text, secret = example.string("text"), example.string("secret")
        if secret not in text:
            raise example.error("secret", "must be a substring of text")
        result.append(PositiveExample(text, secret))
    return tuple(result)


def _parse_key_rule(file: Path, path: str, data: object, fragments: dict[str, str]) -> KeyRule:
    reader = _Reader(file, path, data, KEY_RULE_KEYS)
    rule_id, description, directions, profiles = _common(reader)
    source = _pattern_text(reader, "key", fragments)
    try:
        key = regex.compile(source, regex.IGNORECASE)
    except regex.error as exc:
        raise reader.error("key", f"invalid pattern: {exc}") from None
    positives, negatives = _parse_examples(reader)
    for index, item in enumerate(positives):
        if not isinstance(item, str) or not item:
            raise reader.error(f"examples.positive[{index}]", "expected a key name (string)")
    value_validators = _parse_validators(reader, "value_validators")
    value_positives: list[str] = []
    value_negatives: list[str] = []
    raw_values = reader.data.get("value_examples", None)
    if raw_values is not None:
        values = _Reader(file, f"{path}.value_examples", raw_values, EXAMPLE_KEYS)
        value_positives = values.strings("positive")
        value_negatives = values.strings("negative")
    if value_validators and not value_positives:
        raise reader.error("value_examples", "value_validators need positive value examples")
    return KeyRule(
        id=rule_id,
        description=description,
        key=key,
        directions=directions,
        profiles=profiles,
        positives=tuple(str(p) for p in positives),
        negatives=tuple(negatives),
        source=file,
        value_validators=value_validators,
        value_positives=tuple(value_positives),
        value_negatives=tuple(value_negatives),
    )
