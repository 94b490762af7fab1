"""Build the clean-traffic corpus described by bench/clean_corpus.yaml into a cache directory.

    python -m bench clean_corpus [--cache DIR] [--only ID ...] [--skip-locks] [--force]

Every package comes from its own registry through its ordinary client (`pip download`,
`npm pack`, `apt-get download`) at a pinned version and is checked against its sha256 before
anything is extracted. Lock files are then generated from the pinned manifests by the real
tools (npm, uv, poetry), a `git log -p` is made from successive pinned releases, and agent
chat payloads wrap corpus files. The result is `DIR/files/<category>/<source>/...` and
`DIR/index.json` (every file with its category, source, size and sha256).

The corpus is not committed (tens of MB); `bench precision` reads it.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = Path(__file__).with_name("clean_corpus.yaml")
DEFAULT_CACHE = Path(os.environ.get("SLUICEGATE_CLEAN_CORPUS", ROOT / ".cache" / "clean-corpus"))
# Fixed identity and clock for generated git history (reproducible commit ids).
GIT_ENV = {
    "GIT_AUTHOR_NAME": "corpus",
    "GIT_AUTHOR_EMAIL": "corpus@example.invalid",
    "GIT_COMMITTER_NAME": "corpus",
    "GIT_COMMITTER_EMAIL": "corpus@example.invalid",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    if result.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


# --- fetching --------------------------------------------------------------------------------


def fetch(spec: dict[str, Any], kind: str, downloads: Path) -> Path:
    """The pinned archive in `downloads`, fetched with the registry's client if missing."""
    target = downloads / spec["file"]
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            where = Path(tmp)
            name, version = spec["name"], spec["version"]
            if kind == "pypi":
                binary = ["--no-binary", name] if spec.get("sdist") else ["--only-binary", ":all:"]
                run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *binary,
                     "-d", str(where), f"{name}=={version}"])  # fmt: skip
            elif kind == "npm":
                run(["npm", "pack", "-q", f"{name}@{version}", "--pack-destination", str(where)])
            elif kind == "deb":
                run(["apt-get", "download", f"{name}={version}"], cwd=where)
            else:
                raise ValueError(kind)
            produced = where / spec["file"]
            if not produced.exists():
                found = ", ".join(p.name for p in where.iterdir())
                raise SystemExit(f"{name} {version}: expected {spec['file']}, got {found}")
            produced.rename(target)
    digest = sha256_file(target)
    if spec["sha256"] != "PENDING" and digest != spec["sha256"]:
        target.unlink()
        raise SystemExit(f"{spec['file']}: sha256 {digest}, manifest says {spec['sha256']}")
    if spec["sha256"] == "PENDING":
        log(f"  {spec['file']}: sha256 {digest} (not pinned in the manifest yet)")
    return target


def members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(path, content) of the regular files of a wheel, a tarball or a .deb, in name order."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if not info.is_dir():
                    yield info.filename, zf.read(info)
        return
    if archive.suffix == ".deb":
        raw = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True
        ).stdout
    else:
        raw = archive.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile():
                handle = tar.extractfile(member)
                if handle is not None:
                    yield member.name.removeprefix("./"), handle.read()


def safe_relpath(name: str) -> str:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts)


def extract(source: dict[str, Any], archive: Path, files: Path, max_file: int) -> int:
    selects = source["select"]
    used = [0] * len(selects)
    count = 0
    for name, data in members(archive):
        for index, select in enumerate(selects):
            if not fnmatch.fnmatchcase(name, select["glob"]):
                continue
            if select.get("gunzip") and name.endswith(".gz"):
                data, name = gzip.decompress(data), name[:-3]
            limit = select.get("max_bytes")
            too_big = len(data) > select.get("max_file", max_file)
            if too_big or (limit is not None and used[index] + len(data) > limit):
                break
            used[index] += len(data)
            out = files / select["category"] / source["id"] / safe_relpath(name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            count += 1
            break  # the first matching select decides
    return count


# --- generated files -------------------------------------------------------------------------


def tools_venv(cache: Path, tools: dict[str, str]) -> Path:
    venv = cache / "tools"
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    wanted = [f"{name}=={version}" for name, version in sorted(tools.items())]
    stamp = venv / ".installed"
    if not stamp.exists() or stamp.read_text() != "\n".join(wanted):
        run([str(python), "-m", "pip", "install", "-q", *wanted])
        stamp.write_text("\n".join(wanted))
    return venv / "bin"


def make_locks(spec: dict[str, Any], cache: Path, files: Path) -> int:
    before = spec["before"]
    out_dir = files / "lock-file"
    count = 0
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for item in spec.get("npm", []):
            work = Path(tmp) / f"npm-{item['id']}"
            work.mkdir()
            manifest = {"name": item["id"], "version": "1.0.0", "private": True,
                        "dependencies": item.get("dependencies", {}),
                        "devDependencies": item.get("devDependencies", {})}  # fmt: skip
            (work / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
            log(f"  npm lock {item['id']}")
            run(["npm", "install", "--package-lock-only", "--ignore-scripts", "--no-audit",
                 "--no-fund"], cwd=work)  # fmt: skip
            target = out_dir / f"npm-{item['id']}"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "package-lock.json", target / "package-lock.json")
            count += 1
        if spec.get("uv") or spec.get("poetry"):
            bin_dir = tools_venv(cache, spec["tools"])
        for item in spec.get("uv", []):
            work = Path(tmp) / f"uv-{item['id']}"
            work.mkdir()
            deps = "".join(f'    "{d}",\n' for d in item["dependencies"])
            (work / "pyproject.toml").write_text(
                f'[project]\nname = "{item["id"]}"\nversion = "1.0.0"\n'
                f'requires-python = ">=3.11"\ndependencies = [\n{deps}]\n'
            )
            log(f"  uv lock {item['id']}")
            env = {"UV_INDEX_URL": "https://pypi.org/simple", "UV_CACHE_DIR": str(cache / "uv")}
            run([str(bin_dir / "uv"), "lock", "--exclude-newer", before], cwd=work, env=env)
            target = out_dir / f"uv-{item['id']}"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "uv.lock", target / "uv.lock")
            count += 1
        for item in spec.get("poetry", []):
            work = Path(tmp) / f"poetry-{item['id']}"
            work.mkdir()
            deps = "".join(f'    "{n}=={v}",\n' for n, v in item["dependencies"].items())
            (work / "pyproject.toml").write_text(
                f'[project]\nname = "{item["id"]}"\nversion = "1.0.0"\n'
                f'requires-python = ">=3.11,<4"\ndependencies = [\n{deps}]\n'
                "\n[tool.poetry]\npackage-mode = false\n"
            )
            log(f"  poetry lock {item['id']}")
            run([str(bin_dir / "poetry"), "lock", "--no-interaction"], cwd=work,
                env={"POETRY_CACHE_DIR": str(cache / "poetry-cache"),
                     "POETRY_VIRTUALENVS_CREATE": "false"})  # fmt: skip
            target = out_dir / f"poetry-{item['id']}"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "poetry.lock", target / "poetry.lock")
            count += 1
    return count


def make_git_log(spec: dict[str, Any], cache: Path, downloads: Path, files: Path) -> int:
    repo = cache / "work" / spec["id"]
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    run(["git", "init", "-q", "-b", "main"], cwd=repo, env=GIT_ENV)
    for number, release in enumerate(spec["releases"]):
        archive = fetch({"name": spec["pypi_name"], "sdist": True, **release}, "pypi", downloads)
        for child in repo.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        for name, data in members(archive):
            relative = safe_relpath(name.split("/", 1)[1] if "/" in name else name)
            out = repo / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        stamp = f"2024-01-{number + 1:02d}T12:00:00+00:00"
        env = {**GIT_ENV, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        run(["git", "add", "-A"], cwd=repo, env=env)
        run(["git", "commit", "-q", "-m", f"{spec['pypi_name']} {release['version']}"],
            cwd=repo, env=env)  # fmt: skip
    text = run(["git", "log", "-p", "--no-color"], cwd=repo, env=GIT_ENV)
    target = files / "git-log" / spec["id"]
    target.mkdir(parents=True, exist_ok=True)
    (target / "git-log-p.txt").write_text(text)
    return 1


# Tool definitions of a typical coding agent (parameters named like credentials on purpose:
# agents do send such schemas, and a key rule must never replace them).
AGENT_TOOLS = [
    {"name": "read_file", "description": "Read a file from the workspace.",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                    "required": ["path"]}},
    {"name": "write_file", "description": "Write a file to the workspace.",
     "parameters": {"type": "object", "properties": {
         "path": {"type": "string"}, "content": {"type": "string"}},
         "required": ["path", "content"]}},
    {"name": "run_command", "description": "Run a shell command.",
     "parameters": {"type": "object", "properties": {
         "command": {"type": "string"}, "timeout": {"type": "integer", "default": 120}},
         "required": ["command"]}},
    {"name": "db_connect", "description": "Open a database session for queries.",
     "parameters": {"type": "object", "properties": {
         "host": {"type": "string"}, "user": {"type": "string"},
         "password": {"type": "string", "description": "Database password."},
         "token": {"type": "object", "properties": {"value": {"type": "string"},
                                                    "expires": {"type": "integer"}}},
         "credentials": {"type": "array", "items": {"type": "string"}}},
         "required": ["host", "user"]}},
]  # fmt: skip


def _openai_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": tool} for tool in AGENT_TOOLS]


def _anthropic_tools() -> list[dict[str, Any]]:
    return [
        {"name": t["name"], "description": t["description"], "input_schema": t["parameters"]}
        for t in AGENT_TOOLS
    ]


def wrap(kind: int, path: str, text: str, serial: int) -> dict[str, Any]:
    """One agent payload carrying `text` (the content of corpus file `path`)."""
    call_id = f"call_{serial:06d}"
    system = "You are a coding agent working in the user's repository."
    if kind == 0:  # OpenAI chat: file pasted in a user message
        return {"model": "gpt-4o", "temperature": 0, "tools": _openai_tools(), "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Here is `{path}`:\n\n```\n{text}\n```\nWhat does it do?"},
        ]}  # fmt: skip
    if kind == 1:  # OpenAI chat: file read by a tool call, returned in a tool message
        arguments = json.dumps({"path": path})
        return {"model": "gpt-4o", "tools": _openai_tools(), "tool_choice": "auto", "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Review {path}."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "read_file", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": text},
        ]}  # fmt: skip
    if kind == 2:  # OpenAI chat: the agent writes the file through tool-call arguments
        arguments = json.dumps({"path": path, "content": text})
        return {"model": "gpt-4o", "tools": _openai_tools(), "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Restore {path} from the backup."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": "write_file", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "ok"},
        ]}  # fmt: skip
    if kind == 3:  # Anthropic messages: tool_use read, tool_result with the file
        tool_id = f"toolu_{serial:06d}"
        return {"model": "claude-3-5-sonnet-20241022", "max_tokens": 4096, "system": system,
                "tools": _anthropic_tools(), "messages": [
            {"role": "user", "content": f"Look at {path}."},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Reading the file."},
                {"type": "tool_use", "id": tool_id, "name": "read_file",
                 "input": {"path": path}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": tool_id,
                 "content": [{"type": "text", "text": text}]}]},
        ]}  # fmt: skip
    # Anthropic messages: the agent writes the file (tool_use input), Anthropic-shaped reply
    tool_id = f"toolu_{serial:06d}"
    return {"model": "claude-3-5-sonnet-20241022", "max_tokens": 4096, "system": system,
            "tools": _anthropic_tools(), "messages": [
        {"role": "user", "content": f"Create {path}."},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": tool_id, "name": "write_file",
             "input": {"path": path, "content": text}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": "written"}]},
    ]}  # fmt: skip


WRAPPERS = 5


def make_chat_payloads(spec: dict[str, Any], files: Path) -> int:
    candidates = sorted(
        p for p in files.rglob("*")
        if p.is_file() and p.relative_to(files).parts[0] not in ("chat-payload",)
    )  # fmt: skip
    ranked = sorted(
        candidates, key=lambda p: hashlib.sha256(str(p.relative_to(files)).encode()).digest()
    )
    target = files / "chat-payload" / "agents"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    count = 0
    for path in ranked:
        if count >= spec["count"]:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        text = text[: spec["max_file_chars"]]
        relative = str(path.relative_to(files))
        payload = wrap(count % WRAPPERS, relative.split("/", 2)[-1], text, count)
        (target / f"{count:04d}-{path.parts[-1]}.json").write_text(json.dumps(payload, indent=1))
        count += 1
    return count


# --- driver ----------------------------------------------------------------------------------


def write_index(files: Path, cache: Path) -> dict[str, Any]:
    entries = []
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        category, source, *_ = path.relative_to(files).parts
        entries.append({"path": str(path.relative_to(files)), "category": category,
                        "source": source, "bytes": path.stat().st_size,
                        "sha256": sha256_file(path)})  # fmt: skip
    index = {"files": entries, "bytes": sum(e["bytes"] for e in entries)}
    (cache / "index.json").write_text(json.dumps(index, indent=1))
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--only", nargs="*", help="source ids to (re)extract")
    parser.add_argument("--skip-locks", action="store_true", help="do not generate lock files")
    parser.add_argument("--force", action="store_true", help="rebuild files/ from scratch")
    args = parser.parse_args(argv)
    manifest = yaml.safe_load(args.manifest.read_text(encoding="utf-8"))
    cache: Path = args.cache.resolve()
    downloads, files = cache / "downloads", cache / "files"
    if args.force and files.exists():
        shutil.rmtree(files)
    downloads.mkdir(parents=True, exist_ok=True)
    files.mkdir(parents=True, exist_ok=True)
    for source in manifest["sources"]:
        if args.only and source["id"] not in args.only:
            continue
        kind = next(k for k in ("pypi", "npm", "deb") if k in source)
        log(f"{source['id']}: {kind} {source[kind]['name']} {source[kind]['version']}")
        archive = fetch(source[kind], kind, downloads)
        for category in {s["category"] for s in source["select"]}:
            shutil.rmtree(files / category / source["id"], ignore_errors=True)
        log(f"  {extract(source, archive, files, manifest['max_file'])} files")
    if not args.only:
        if not args.skip_locks:
            log(f"lock files: {make_locks(manifest['locks'], cache, files)}")
        log(f"git log: {make_git_log(manifest['git_log'], cache, downloads, files)}")
        log(f"chat payloads: {make_chat_payloads(manifest['chat_payloads'], files)}")
    index = write_index(files, cache)
    sizes: dict[str, int] = {}
    for entry in index["files"]:
        sizes[entry["category"]] = sizes.get(entry["category"], 0) + entry["bytes"]
    for category, size in sorted(sizes.items()):
        log(f"{category:>16}: {size / 1e6:7.2f} MB")
    log(f"{'total':>16}: {index['bytes'] / 1e6:7.2f} MB in {len(index['files'])} files -> {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
