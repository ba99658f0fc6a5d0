"""List the input collection: one item per image file, sorted, with where its caption comes from.

Captions come from a sidecar with the image's stem (``.txt``, ``.caption``, or ``.json`` with a
``caption``/``text`` field), else from a ``metadata.jsonl``/``.csv``/``.parquet`` listing
``file_name`` and ``text`` (the Hugging Face imagefolder convention; ``file_name`` is relative to
the metadata file's folder), else "". Sidecars are read by the workers, metadata files here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
from stat import S_IFBLK, S_IFCHR, S_IFIFO, S_IFMT, S_IFSOCK, S_ISREG

import pyarrow.fs as pafs

from manifests.io import join, resolve

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SIDECAR_EXTENSIONS = (".txt", ".caption", ".json")  # first found wins
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CAPTION_FIELDS = ("text", "caption")

log = logging.getLogger("annotate")


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One image file of the collection."""

    id: str
    """Stable key: hash of ``source``."""
    source: str
    """Path relative to the input root, '/'-separated (a name that is not UTF-8 shown with \\x escapes)."""
    sidecar: str | None = None
    """Relative path of the caption sidecar, read by the worker."""
    caption: str | None = None
    """Caption from a metadata file, when there is one for this file."""
    stamp: str = ""
    """Size and modification time of the file and its sidecar (and the metadata caption): what
    resume compares to notice a file overwritten or a caption edited between runs."""
    problem: str | None = None
    """Why this file cannot be read at all (its row becomes an error without a read)."""


@dataclasses.dataclass
class InputListing:
    """The sorted image items under an input root, and what was not an image."""

    root: str
    items: list[InputItem]
    ignored: int
    """Files that are neither images, sidecars nor metadata (not rows of the manifest)."""
    skipped_links: list[str] = dataclasses.field(default_factory=list)
    """Symlinked folders not followed because their real folder was already listed (loops, repeats)."""


@dataclasses.dataclass(frozen=True)
class ListedFile:
    """A file found under the input root, with what resume compares."""

    path: str
    """Relative path, '/'-separated (surrogate-escaped where the name is not UTF-8)."""
    size: int
    mtime_ns: int
    unusable: str | None = None
    """Why the file cannot be read as a file ("a FIFO", "a broken link", ...); None: a regular file."""


def row_id(source: str) -> str:
    """The manifest id of a relative source path."""
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def printable(path: str) -> str:
    """A path as valid UTF-8 text: bytes of a name that is not UTF-8 become ``\\xNN`` escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_inputs(root: str) -> InputListing:
    """All image files under ``root`` (recursive), sorted by relative path.

    On a local disk each real folder is listed once: a symlinked folder whose target was already
    listed (a loop such as ``sub/up -> ..``, or a second link to one folder) is skipped and
    counted, so a loop cannot multiply rows. Links to files are followed; a broken link to an
    image becomes an error row.
    """
    fs, base = resolve(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        what = "does not exist" if info.type == pafs.FileType.NotFound else "is not a folder"
        raise FileNotFoundError(f"--input {root} {what}; give a folder or bucket prefix of images")
    if isinstance(fs, pafs.LocalFileSystem):
        files, skipped = _walk_local(base)
    else:  # object stores have no links
        files, skipped = _walk_fs(fs, base), []
    files.sort(key=lambda f: f.path)
    # Sidecars match their image's stem exactly and their extension in any case (IMG_1.TXT).
    # Only regular files are read as sidecars or metadata: opening a FIFO would wait forever.
    regular = [f for f in files if f.unusable is None]
    sidecars = {(posixpath.splitext(f.path)[0], posixpath.splitext(f.path)[1].lower()): f for f in regular}
    metadata_captions = _metadata_captions(
        fs, base, [f.path for f in regular if posixpath.basename(f.path) in METADATA_NAMES])
    items, ignored = [], 0
    for listed in files:
        source = listed.path
        stem, ext = posixpath.splitext(source)
        if ext.lower() not in IMAGE_EXTENSIONS:
            is_sidecar = ext.lower() in SIDECAR_EXTENSIONS or posixpath.basename(source) in METADATA_NAMES
            ignored += 0 if is_sidecar else 1
            continue
        sidecar = next((sidecars[(stem, e)] for e in SIDECAR_EXTENSIONS if (stem, e) in sidecars), None)
        caption = metadata_captions.get(source)
        stamp = ";".join(str(x) for x in (
            listed.size, listed.mtime_ns,
            *((sidecar.path, sidecar.size, sidecar.mtime_ns) if sidecar else ()),
            hashlib.sha256(caption.encode()).hexdigest()[:16] if caption is not None else "",
        ))
        shown = printable(source)
        problem = None
        if shown != source:
            problem = "file name is not valid UTF-8 (shown with \\x escapes); rename the file to annotate it"
        elif listed.unusable is not None:
            problem = f"not a regular file ({listed.unusable})"
        items.append(InputItem(row_id(source), shown, sidecar.path if sidecar else None, caption, stamp, problem))
    return InputListing(root=root, items=items, ignored=ignored, skipped_links=skipped)


def _walk_local(base: str) -> tuple[list[ListedFile], list[str]]:
    """Files under a local folder, entering each real folder once.

    Real sub-folders are walked first; a symlinked folder is entered afterwards only if its
    target was not reached already, so a folder's files keep their link-free path when they have
    one and a loop (``sub/up -> ..``) ends at once.
    """
    files: list[ListedFile] = []
    skipped: list[str] = []
    root_stat = os.stat(base)
    seen = {(root_stat.st_dev, root_stat.st_ino)}
    stack: list[str] = [""]
    links: list[str] = []
    while stack or links:
        if not stack:
            links.sort(reverse=True)
            link = links.pop()
            stat = os.stat(os.path.join(base, link))
            if (stat.st_dev, stat.st_ino) in seen:
                skipped.append(printable(link))
                continue
            seen.add((stat.st_dev, stat.st_ino))
            stack.append(link)
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(os.path.join(base, rel_dir) if rel_dir else base), key=lambda e: e.name)
        except OSError as exc:  # an unreadable folder: say so, the rest is listed
            log.warning("cannot list %s: %s", printable(os.path.join(base, rel_dir)), exc)
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir and entry.is_symlink():
                links.append(rel)
            elif is_dir:
                stat = entry.stat(follow_symlinks=False)
                if (stat.st_dev, stat.st_ino) not in seen:  # a bind mount can repeat a folder too
                    seen.add((stat.st_dev, stat.st_ino))
                    stack.append(rel)
            else:
                try:
                    stat = entry.stat(follow_symlinks=True)
                except OSError as exc:  # a broken link: listed, so an image among them becomes an error row
                    files.append(ListedFile(rel, -1, -1, f"a broken link: {exc.strerror or exc}"))
                    continue
                kind = None if S_ISREG(stat.st_mode) else _KINDS.get(S_IFMT(stat.st_mode), "not a file")
                files.append(ListedFile(rel, stat.st_size, stat.st_mtime_ns, kind))
    return files, skipped


_KINDS = {S_IFIFO: "a FIFO", S_IFSOCK: "a socket", S_IFCHR: "a character device", S_IFBLK: "a block device"}


def _walk_fs(fs: pafs.FileSystem, base: str) -> list[ListedFile]:
    """Files under a prefix of any pyarrow filesystem (an object store: no links)."""
    found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return [
        ListedFile(posixpath.relpath(f.path, base), f.size or 0, f.mtime_ns or 0)
        for f in found if f.type == pafs.FileType.File
    ]


def _metadata_captions(fs: pafs.FileSystem, base: str, metadata_files: list[str]) -> dict[str, str]:
    """{relative image path: caption} from every metadata file in the tree.

    A metadata file that cannot be parsed stops the job here, before any work, with a message
    naming the file (and the line, for JSON lines).
    """
    import pandas as pd
    captions: dict[str, str] = {}
    for rel in metadata_files:
        frame = _read_table(printable(rel), _read_bytes(fs, base, rel))
        field = next((c for c in CAPTION_FIELDS if c in frame.columns), None)
        if "file_name" not in frame.columns or field is None:
            raise ValueError(
                f"{printable(rel)}: a metadata file needs a 'file_name' column and a 'text' (or 'caption') "
                f"column; it has {list(frame.columns)}"
            )
        folder = posixpath.dirname(rel)
        for name, text in zip(frame["file_name"], frame[field]):
            key = posixpath.normpath(posixpath.join(folder, str(name)))
            captions[key] = "" if pd.isna(text) else str(text)
    return captions


def _read_bytes(fs: pafs.FileSystem, base: str, rel: str) -> bytes:
    """A listed file's bytes; on a local disk through ``open``, which takes names that are not UTF-8."""
    if isinstance(fs, pafs.LocalFileSystem):
        with open(os.path.join(base, rel), "rb") as f:
            return f.read()
    with fs.open_input_file(join(base, rel)) as f:
        return f.read()


def _read_table(name: str, data: bytes) -> "pd.DataFrame":
    """A metadata file as a frame; a file that does not parse raises ``ValueError`` naming it."""
    import pandas as pd

    if name.endswith(".jsonl"):
        return pd.DataFrame(_json_lines(name, data))
    try:
        if name.endswith(".csv"):
            return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8")
        return pd.read_parquet(io.BytesIO(data))
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
        raise ValueError(f"{name}: cannot read this metadata file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); fix or remove it") from exc


def _json_lines(name: str, data: bytes) -> list[dict]:
    """The records of a JSON-lines file; a bad line (a truncated file) is named with its number."""
    records = []
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as Windows editors write
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{name} line {number}: not a JSON record ({exc}); fix or remove the line "
                             "(a truncated file ends mid-record)") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{name} line {number}: a JSON object is expected, found {type(record).__name__}")
        records.append(record)
    return records


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """Caption text from a sidecar's bytes and, when it was not UTF-8, the encoding used instead.

    A caption in a legacy encoding (Windows-1252, Latin-1) keeps its image: it is decoded with
    the first encoding that fits, and the job records which file needed it.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte-order mark (Notepad's "Unicode")
        try:
            return data.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"  # every byte string decodes


def read_sidecar(fs: pafs.FileSystem, base: str, sidecar: str) -> tuple[str, str | None]:
    """(caption, encoding used when not UTF-8) of a sidecar; ``.json`` holds it in ``caption`` or ``text``."""
    with fs.open_input_file(join(base, sidecar)) as f:
        text, encoding = decode_caption(f.read())
    if not sidecar.lower().endswith(".json"):
        return text.strip(), encoding
    record = json.loads(text)
    for field in ("caption", "text"):
        if isinstance(record, dict) and isinstance(record.get(field), str):
            return record[field].strip(), encoding
    raise ValueError(f"{sidecar} has no string 'caption' or 'text' field")


def read_sidecar_caption(fs: pafs.FileSystem, base: str, sidecar: str) -> str:
    """The caption in a sidecar file."""
    return read_sidecar(fs, base, sidecar)[0]
