"""List the input collection as a stream: one item per image file, in sorted order, with its caption's source.

Two ways in:

- ``iter_inputs(root)``: every image file under a folder or bucket prefix, streamed in sorted order
  of the relative path (``list_inputs`` materialises it for small jobs and tests). The tree is walked
  folder by folder, each folder listed on its own, so the driver holds one folder's names at a time
  (per level of the current path), never the whole collection.
- ``iter_input_list(list_file, root)``: the paths or URIs named in a Parquet, CSV or text file
  (``--input-list``), streamed in the file's order.

Captions of a listed tree come from a sidecar with the image's stem (``.txt``, ``.caption``, or
``.json`` with a ``caption``/``text`` field), else from a ``metadata.jsonl``/``.csv``/``.parquet``
listing ``file_name`` and ``text`` (the Hugging Face imagefolder convention; ``file_name`` is
relative to the metadata file's folder and captions files of that folder and below), else "".
Sidecars are read by the workers (``SourceReader``), metadata files here, when their folder is
entered. Captions of an input list come from its ``caption``/``text`` column.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import posixpath
import re
import threading
import urllib.parse
from dataclasses import field
from stat import S_IFBLK, S_IFCHR, S_IFIFO, S_IFMT, S_IFSOCK, S_ISREG
from typing import Any, Iterator

import pyarrow.fs as pafs

from manifests.io import join, resolve

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SIDECAR_EXTENSIONS = (".txt", ".caption", ".json")  # first found wins
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CAPTION_FIELDS = ("text", "caption")
LIST_PATH_COLUMNS = ("path", "source", "uri", "file_name", "image")  # first present wins, else column 0
LIST_CAPTION_COLUMNS = ("caption", "text")
NOT_UTF8 = "file name is not valid UTF-8 (shown with \\x escapes); rename the file to annotate it"

log = logging.getLogger("annotate")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One image file of the collection."""

    id: str
    """Stable key: hash of ``source``."""
    source: str
    """Path relative to the input root, '/'-separated (a name that is not UTF-8 shown with \\x escapes);
    for an input list without a root, the absolute path or URI as listed."""
    sidecar: str | None = None
    """Relative path of the caption sidecar, read by the worker."""
    caption: str | None = None
    """Caption from a metadata file (or the input list's caption column), when there is one."""
    stamp: str = ""
    """Size and modification time of the file and its sidecar (and the metadata caption): what
    resume compares to notice a file overwritten or a caption edited between runs."""
    problem: str | None = None
    """Why this file cannot be read at all (its row becomes an error without a read)."""
    caption_from: str | None = None
    """Where ``caption`` came from: ``metadata`` or ``list`` (None when there is none)."""
    caption_problem: str | None = None
    """Why the metadata or list caption cannot be used (not text, not valid Unicode), naming the
    file and line: the row becomes an error at its caption stage, the job goes on."""


@dataclasses.dataclass
class ListingStats:
    """Counts gathered while a listing streams (complete once the iterator is exhausted)."""

    images: int = 0
    """Items yielded (problem items included)."""
    ignored: int = 0
    """Files that are neither images, sidecars nor metadata (not rows of the manifest)."""
    skipped_links: list[str] = field(default_factory=list)
    """Folders not entered because their real folder is listed through another path (symlink loops,
    links into the input, a second link to one folder), printable relative paths."""


@dataclasses.dataclass
class InputListing:
    """The sorted image items under an input root, and what was not an image (``list_inputs``)."""

    items: list[InputItem]
    ignored: int
    """Files that are neither images, sidecars nor metadata (not rows of the manifest)."""
    skipped_links: list[str] = dataclasses.field(default_factory=list)
    """Symlinked folders not followed because their real folder is listed already (loops, repeats)."""


class CaptionError(ValueError):
    """A caption that cannot be stored: not text, or text that is not valid Unicode. It fails its row."""


def caption_text(value: Any, where: str) -> str | None:
    """A caption value from any source (sidecar, metadata record, list column) as text, or None when
    there is none (null, NaN); raises ``CaptionError`` naming ``where`` for anything else.

    Numbers, lists and objects are refused rather than turned into text: ``5`` or ``["a", "b"]``
    in a ``text`` field is a mistake in the data, and a made-up caption would train on it silently.
    A lone surrogate (valid JSON, ``"\\ud800"``) is refused too: it cannot be written as UTF-8, and
    cleaning it would change the caption without a word; the row says where it is so it can be fixed.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bytes, bytearray)):  # a binary column: decoded as a sidecar's bytes are
        value = decode_caption(bytes(value))[0]
    if not isinstance(value, str):
        kind = "a list" if isinstance(value, (list, tuple)) else "an object" if isinstance(value, dict) else \
            f"a {type(value).__name__}"
        raise CaptionError(f"{where}: the caption is {kind}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CaptionError(f"{where}: the caption is not valid Unicode (a lone surrogate U+{ord(value[exc.start]):04X} "
                           f"at character {exc.start}); fix the text") from None
    return value


def cap_caption(caption: str, max_chars: int) -> tuple[str, int | None]:
    """(the caption cut to ``max_chars`` characters, its original length when it was cut, else None)."""
    if len(caption) <= max_chars:
        return caption, None
    return caption[:max_chars].rstrip(), len(caption)


def row_id(source: str) -> str:
    """The manifest id of a relative source path."""
    return hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def printable(path: str) -> str:
    """A path as valid UTF-8 text: bytes of a name that is not UTF-8 become ``\\xNN`` escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_inputs(root: str) -> InputListing:
    """All image files under ``root`` (recursive), sorted by relative path, as one list.

    For small jobs and tests: it holds every item (about 1 KB each); a large job streams
    ``iter_inputs`` instead.
    """
    stats = ListingStats()
    items = list(iter_inputs(root, stats))
    return InputListing(items=items, ignored=stats.ignored, skipped_links=stats.skipped_links)


# --- a folder tree, streamed ---------------------------------------------------------------------------

def iter_inputs(root: str, stats: ListingStats) -> Iterator[InputItem]:
    """InputItems under root, streamed in the same sorted order list_inputs gives today.

    The order is that of the relative path strings (``sorted()`` of the full paths), so an existing
    manifest resumes with the same shard slices. It is produced folder by folder: each folder is
    listed alone (``os.scandir`` on a local disk, a non-recursive ``FileSelector`` elsewhere; object
    stores list per prefix) and its entries sorted with a folder keyed as ``name + "/"``, which
    makes depth-first order equal full-path order. Memory: the entries of the folders on the current
    path (bounded by the largest folder), plus the captions of the metadata files above it.

    On a local disk a symlinked folder is entered at its sorted position, unless its real target
    lies inside the input's real path (its files are listed through their real path anyway; a loop
    such as ``sub/up -> ..`` ends here) or inside a folder already entered through a link, or it is
    a folder already entered through a link (same device and inode); those are skipped and named
    in ``stats.skipped_links``. Links to files are followed; a broken link, a FIFO, a socket or a
    device named like an image becomes an item with a ``problem`` (never opened), and so does a
    name that is not UTF-8. A folder that cannot be listed is logged and skipped.

    A metadata file is read when its folder is entered and captions files of that folder and
    below; one that cannot be parsed raises ``ValueError`` naming the file (and the line) when the
    stream reaches its folder. Where two metadata files caption one file, the one whose path sorts
    last wins. The root is checked at once: a missing root raises ``FileNotFoundError`` here.
    """
    fs, base = resolve(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        what = "does not exist" if info.type == pafs.FileType.NotFound else "is not a folder"
        raise FileNotFoundError(f"--input {root} {what}; give a folder or bucket prefix of images")
    tree = _LocalTree(base, stats) if isinstance(fs, pafs.LocalFileSystem) else _StoreTree(fs, base)
    return _stream(tree, stats)


_FILE, _DIR = 0, 1
_KINDS = {S_IFIFO: "a FIFO", S_IFSOCK: "a socket", S_IFCHR: "a character device", S_IFBLK: "a block device"}


def _sort_key(entry: tuple) -> str:
    return entry[0]


def _under(path: str, tops: set[str]) -> bool:
    """Whether ``path`` is one of ``tops`` or inside one (real, absolute paths)."""
    while True:
        if path in tops:
            return True
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


class _LocalTree:
    """Folders of a local disk: links followed by the rules of ``iter_inputs``."""

    def __init__(self, base: str, stats: ListingStats) -> None:
        self.base = base
        self.stats = stats
        stat = os.stat(base)
        self.root_token = (stat.st_dev, stat.st_ino)
        self.open = {self.root_token}
        """(st_dev, st_ino) of the folders on the current path: a bind mount repeating one ends here."""
        self.seen: set[tuple[int, int]] = set()
        """(st_dev, st_ino) of every folder entered through a link."""
        self.listed_reals = {os.path.realpath(base)}
        """Real paths whose whole subtree is listed: the root and the targets of followed links."""

    def entries(self, rel_dir: str) -> list[tuple] | None:
        """A folder's (key, kind, is_link) entries, sorted descending (popped from the end); None if unreadable."""
        path = os.path.join(self.base, rel_dir) if rel_dir else self.base
        found = []
        try:
            with os.scandir(path) as listing:
                for entry in listing:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=True)
                        is_link = is_dir and entry.is_symlink()
                    except OSError:
                        is_dir = False
                    if is_dir:
                        found.append((entry.name + "/", _DIR, is_link))
                    else:
                        found.append((entry.name, _FILE, None))
        except OSError as exc:  # an unreadable folder: say so, the rest is listed
            log.warning("cannot list %s: %s", printable(path), exc)
            return None
        found.sort(key=_sort_key, reverse=True)
        return found

    def enter(self, rel: str, is_link: bool) -> tuple[int, int] | None:
        """A token to list the folder ``rel`` with (pass it to ``leave``), or None to skip it."""
        path = os.path.join(self.base, rel)
        try:
            stat = os.stat(path)
        except OSError as exc:
            log.warning("cannot list %s: %s", printable(path), exc)
            return None
        key = (stat.st_dev, stat.st_ino)
        if is_link:
            real = os.path.realpath(path)
            if key in self.seen or key in self.open or _under(real, self.listed_reals):
                self.stats.skipped_links.append(printable(rel))
                return None
            self.seen.add(key)
            self.listed_reals.add(real)
        elif key in self.open or key in self.seen:  # a bind mount, or a folder a link listed already
            self.stats.skipped_links.append(printable(rel))
            return None
        self.open.add(key)
        return key

    def leave(self, token: Any) -> None:
        self.open.discard(token)

    def stat(self, rel: str, info: Any) -> tuple[int, int, str | None]:
        """(size, mtime_ns, why it cannot be read or None), following links."""
        try:
            stat = os.stat(os.path.join(self.base, rel))
        except OSError as exc:  # a broken link: listed, so an image among them becomes an error row
            return -1, -1, f"not a regular file (a broken link: {exc.strerror or exc})"
        if S_ISREG(stat.st_mode):
            return stat.st_size, stat.st_mtime_ns, None
        return stat.st_size, stat.st_mtime_ns, f"not a regular file ({_KINDS.get(S_IFMT(stat.st_mode), 'not a file')})"

    def read(self, rel: str) -> bytes:
        """A listed file's bytes, through ``open``, which takes names that are not UTF-8."""
        with open(os.path.join(self.base, rel), "rb") as f:
            return f.read()


#: Why an object under an empty path segment (``a//b.jpg``) becomes an error row instead of being read.
EMPTY_SEGMENT = ("object key has an empty path segment ('//'), which pyarrow's filesystems cannot open; "
                 "copy it to a key without '//' to annotate it")


class _StoreTree:
    """Prefixes of any pyarrow filesystem (an object store: no links; sizes come with the listing).

    Object keys are not folder paths: ``odd//double.jpg`` has an empty segment, which pyarrow lists
    (as a folder entry named like the folder itself) but can neither list on its own nor open. Such
    keys are found with one recursive listing of the folder above and become items with a problem,
    so each is an error row naming it, never a silent drop. Folder markers (``dir/``, empty objects
    whose key ends in '/') are folders, not files.
    """

    def __init__(self, fs: pafs.FileSystem, base: str) -> None:
        self.fs = fs
        self.base = base
        self.root_token = True

    def entries(self, rel_dir: str) -> list[tuple] | None:
        path = join(self.base, rel_dir) if rel_dir else self.base
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False))
        except OSError as exc:
            log.warning("cannot list %s: %s", path, exc)
            return None
        found = []
        for info in infos:
            if info.path.rstrip("/") == path.rstrip("/"):  # the prefix "<folder>//": keys with an empty segment
                found.extend(self._under_empty_segment(path))
            elif info.type == pafs.FileType.Directory:
                found.append((info.base_name + "/", _DIR, None))
            elif info.type == pafs.FileType.File:
                found.append((info.base_name, _FILE, (info.size or 0, info.mtime_ns or 0, None)))
        found.sort(key=_sort_key, reverse=True)
        return found

    def _under_empty_segment(self, path: str) -> list[tuple]:
        """Every object whose key continues ``path`` with '//', as a file entry named by the rest of its
        key ('/double.jpg'), so it sorts where its full key does and its source is the key as listed."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except OSError as exc:
            log.warning("cannot list the keys with an empty segment under %s: %s", path, exc)
            return []
        prefix = path.rstrip("/") + "//"
        return [(info.path[len(prefix) - 1:], _FILE, (info.size or 0, info.mtime_ns or 0, EMPTY_SEGMENT))
                for info in infos if info.type == pafs.FileType.File and info.path.startswith(prefix)]

    def enter(self, rel: str, info: Any) -> bool:
        return True

    def leave(self, token: Any) -> None:
        pass

    def stat(self, rel: str, info: Any) -> tuple[int, int, str | None]:
        return info

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(join(self.base, rel)) as f:
            return f.read()


@dataclasses.dataclass
class _Folder:
    """A folder being listed: its entries not yet taken, and its sidecars by (stem, lower-case extension)."""

    rel: str
    entries: list[tuple]
    sidecars: dict[tuple[str, str], list[tuple[str, Any]]]
    token: Any
    has_metadata: bool


#: (metadata file, {path below its folder: caption}) of one metadata file; a folder may hold several.
_Captions = list[tuple[str, dict[str, "str | CaptionError"]]]


class _Walk:
    """The state of one ``_stream`` walk: the folders being listed (a stack) and the metadata captions
    of the folders above the current one."""

    def __init__(self, tree: _LocalTree | _StoreTree, stats: ListingStats) -> None:
        self.tree, self.stats = tree, stats
        self.folders: list[_Folder] = []
        self.scopes: list[tuple[str, _Captions]] = []
        """(folder, its metadata files' captions) of the metadata files above."""

    def open_folder(self, rel_dir: str, token: Any) -> None:
        """List ``rel_dir`` and push it (with its sidecars and metadata captions) onto the stack."""
        entries = self.tree.entries(rel_dir)
        if entries is None:
            self.tree.leave(token)
            return
        sidecars, metadata = _sidecars_and_metadata(entries)
        captions = []
        for name, info in metadata:
            rel = _child(rel_dir, name)
            if self.tree.stat(rel, info)[2] is None:  # a FIFO named metadata.jsonl would wait forever
                captions.append((rel, _metadata_captions(printable(rel), self.tree.read(rel))))
        if captions:
            self.scopes.append((rel_dir, captions))
        self.folders.append(_Folder(rel_dir, entries, sidecars, token, bool(captions)))

    def close(self, folder: _Folder) -> None:
        """Pop a folder whose entries are all taken, with its metadata captions."""
        self.folders.pop()
        self.tree.leave(folder.token)
        if folder.has_metadata:
            self.scopes.pop()

    def enter(self, folder: _Folder, name: str, info: Any) -> None:
        """Open the sub-folder ``name`` (entries of folders end in '/') unless the tree skips it."""
        rel = _child(folder.rel, name[:-1])
        token = self.tree.enter(rel, info)
        if token is not None:
            self.open_folder(rel, token)

    def caption_of(self, rel: str) -> str | CaptionError | None:
        """The metadata caption of ``rel``, if a metadata file above names it."""
        best: tuple[str, str | CaptionError] | None = None
        for folder, files in self.scopes:
            below = rel[len(folder) + 1:] if folder else rel
            for metadata_rel, captions in files:
                text = captions.pop(below, None)  # each file is looked up once: free it
                if text is not None and (best is None or metadata_rel > best[0]):
                    best = (metadata_rel, text)  # as before: the metadata file sorting last wins
        return best[1] if best else None

    def item(self, folder: _Folder, name: str, info: Any) -> InputItem:
        """The input item of the image ``name`` in ``folder``: its sidecar, caption, stamp and problem."""
        source = _child(folder.rel, name)
        size, mtime_ns, unusable = self.tree.stat(source, info)
        sidecar = _sidecar(self.tree, folder, posixpath.splitext(name)[0])
        caption = self.caption_of(source) if self.scopes else None
        caption_problem = str(caption) if isinstance(caption, CaptionError) else None
        stamp = ";".join(str(x) for x in (
            size, mtime_ns,
            *(sidecar if sidecar else ()),
            _caption_stamp(caption_problem or caption),
        ))
        shown = printable(source)
        problem = None
        if shown != source:
            problem = NOT_UTF8
        elif unusable is not None:
            problem = unusable
        self.stats.images += 1
        if caption_problem:
            caption = None
        return InputItem(row_id(source), shown, sidecar[0] if sidecar else None, caption, stamp, problem,
                         "metadata" if caption is not None else None, caption_problem)


def _sidecars_and_metadata(entries: list[tuple]) -> tuple[dict[tuple[str, str], list[tuple[str, Any]]],
                                                          list[tuple[str, Any]]]:
    """A folder's sidecars by (stem, lower-case extension) and its metadata files, in ascending order."""
    # Sidecars match their image's stem exactly and their extension in any case (IMG_1.TXT).
    sidecars: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    metadata = []
    for name, kind, info in reversed(entries):  # ascending
        if kind != _FILE:
            continue
        stem, ext = posixpath.splitext(name)
        if ext.lower() in SIDECAR_EXTENSIONS:
            sidecars.setdefault((stem, ext.lower()), []).append((name, info))
        elif name in METADATA_NAMES:
            metadata.append((name, info))
    return sidecars, metadata


def _stream(tree: _LocalTree | _StoreTree, stats: ListingStats) -> Iterator[InputItem]:
    """The depth-first walk of ``iter_inputs``: items in full-path order, one folder listed at a time."""
    walk = _Walk(tree, stats)
    walk.open_folder("", tree.root_token)
    while walk.folders:
        folder = walk.folders[-1]
        if not folder.entries:
            walk.close(folder)
            continue
        name, kind, info = folder.entries.pop()
        if kind == _DIR:
            walk.enter(folder, name, info)
            continue
        ext = posixpath.splitext(name)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            is_sidecar = ext in SIDECAR_EXTENSIONS or name in METADATA_NAMES
            stats.ignored += 0 if is_sidecar else 1
            continue
        yield walk.item(folder, name, info)


def _caption_stamp(caption: str | None) -> str:
    """A caption's share of a stamp: resume notices an edited caption (or a fixed bad one)."""
    return hashlib.sha256(caption.encode()).hexdigest()[:16] if caption is not None else ""


def _child(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _sidecar(tree: _LocalTree | _StoreTree, folder: _Folder, stem: str) -> tuple[str, int, int] | None:
    """(relative path, size, mtime_ns) of an image's sidecar: the first extension of
    ``SIDECAR_EXTENSIONS`` that has a regular file; of two differing only in case, the one sorting last."""
    for ext in SIDECAR_EXTENSIONS:
        for name, info in reversed(folder.sidecars.get((stem, ext), ())):
            rel = _child(folder.rel, name)
            size, mtime_ns, unusable = tree.stat(rel, info)
            if unusable is None:  # only regular files are read as sidecars: opening a FIFO would hang
                return rel, size, mtime_ns
    return None


def _metadata_captions(name: str, data: bytes) -> dict[str, str | CaptionError]:
    """{path relative to the metadata file's folder: caption} of one metadata file.

    A metadata file that cannot be parsed stops the listing with a message naming the file (and
    the line, for JSON lines). A record whose caption is not text (a number, a list, an object, a
    lone surrogate) maps to a ``CaptionError`` naming the file and line: that row fails, the job goes
    on. Entries pointing outside the file's folder are ignored, with a warning.
    """
    import pandas as pd

    frame = _read_table(name, data)
    column = next((c for c in CAPTION_FIELDS if c in frame.columns), None)
    if "file_name" not in frame.columns or column is None:
        raise ValueError(
            f"{name}: a metadata file needs a 'file_name' column and a 'text' (or 'caption') "
            f"column; it has {list(frame.columns)}"
        )
    unit, numbers = ("line", frame.index) if name.endswith(".jsonl") else ("row", range(1, len(frame) + 1))
    captions: dict[str, str | CaptionError] = {}
    outside = []
    for number, file_name, text in zip(numbers, frame["file_name"], frame[column]):
        key = posixpath.normpath(str(file_name))
        if key == ".." or key.startswith(("../", "/")):
            outside.append(str(file_name))
            continue
        if pd.api.types.is_scalar(text) and pd.isna(text):  # NaN, None, pd.NA: no caption
            text = None
        try:
            captions[key] = caption_text(text, f"{name} {unit} {number}") or ""
        except CaptionError as exc:
            captions[key] = exc
    if outside:
        log.warning("%s: %d file_name entries point outside its folder (%s); a metadata file captions files "
                    "in its folder and below only", name, len(outside), ", ".join(outside[:3]))
    return captions


def _read_table(name: str, data: bytes) -> "pd.DataFrame":
    """A metadata file as a frame; a file that does not parse raises ``ValueError`` naming it."""
    import pandas as pd

    if name.endswith(".jsonl"):
        numbers, records = _json_lines(name, data)
        return pd.DataFrame(records, index=numbers, dtype=object)
    try:
        if name.endswith(".csv"):
            return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8")
        return pd.read_parquet(io.BytesIO(data))
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
        raise ValueError(f"{name}: cannot read this metadata file ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); fix or remove it") from exc


def _json_lines(name: str, data: bytes) -> tuple[list[int], list[dict]]:
    """(line numbers, records) of a JSON-lines file; a bad line (a truncated file) is named with its number."""
    numbers, records = [], []
    data = data.removeprefix(_BOM)  # a UTF-8 byte-order mark, as Windows editors write
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
        numbers.append(number)
        records.append(record)
    return numbers, records


# --- an input list, streamed ---------------------------------------------------------------------------

def iter_input_list(list_file: str, root: str | None, stats: ListingStats) -> Iterator[InputItem]:
    """--input-list: a Parquet, CSV (.csv) or text (.txt / .lst / anything else: one path per line) file
    of paths or URIs, one per row, with an optional caption column; streamed in the file's order.

    - Parquet is read a batch at a time (``ParquetFile.iter_batches``, only the columns used), CSV
      through ``pyarrow.csv.open_csv`` (streaming; it needs a header row), text a line at a time
      (blank lines and lines starting with ``#`` skipped, a UTF-8 byte-order mark stripped; a pipe
      such as ``--input-list <(find ...)`` works for text lists).
    - The path column is the first of ``path``, ``source``, ``uri``, ``file_name``, ``image``, else
      the first column; the caption column is ``caption`` or ``text`` when there is one (else no
      caption). Listed files get no sidecar lookup: their caption comes from that column or a
      captioner.
    - With ``root``, entries are relative to it (an absolute path or URI, or a path leaving the
      root through ``..``, raises ``ValueError`` naming the row); without it, entries must be
      absolute paths or URIs of any scheme ``manifests.io.resolve`` knows (a relative entry raises
      ``ValueError``). ``source`` is the entry as given, stripped of surrounding whitespace.
    - ``stamp`` is the caption's hash only: nothing is stat'ed per entry (cheap on S3), so resume does
      not notice an image overwritten in place under the same name; change the list (or use
      ``--overwrite``) to redo it.
    - An entry without an image extension is listed on purpose: it becomes an item with a
      ``problem`` (an error row). A repeated entry is noticed only when the repeats are adjacent
      (as in a sorted list; remembering every path would grow with the list): the repeat becomes an
      item with the problem "listed twice (first at row N)" and an id of its own (ids are unique).

    Checked at once: a missing list file raises ``FileNotFoundError`` naming it, a missing root or
    an unusable header ``ValueError``; errors in rows are raised when the stream reaches them.
    """
    fs, path = resolve(list_file)
    local = isinstance(fs, pafs.LocalFileSystem)
    kind = fs.get_file_info(path).type if not local else (
        pafs.FileType.Directory if os.path.isdir(path) else
        pafs.FileType.File if os.path.exists(path) else pafs.FileType.NotFound)
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--input-list {list_file} does not exist")
    if kind == pafs.FileType.Directory:
        raise FileNotFoundError(f"--input-list {list_file} is a folder; give a .parquet, .csv or .txt list "
                                "(or pass the folder as --input)")
    if root is not None:
        root_fs, root_base = resolve(root)
        info = root_fs.get_file_info(root_base)
        if info.type != pafs.FileType.Directory:
            what = "does not exist" if info.type == pafs.FileType.NotFound else "is not a folder"
            raise FileNotFoundError(f"--input {root} {what}; the paths of --input-list {list_file} are "
                                    "relative to it")
    lower = path.lower()
    if lower.endswith(".parquet"):
        rows, unit = _parquet_rows(fs, path, list_file), "row"
    elif lower.endswith(".csv"):
        rows, unit = _csv_rows(fs, path, list_file), "row"
    else:
        rows, unit = _text_rows(fs, path, local), "line"
    return _listed_items(rows, list_file, unit, root, stats)


def _pick_columns(name: str, columns: list[str]) -> tuple[str, str | None]:
    """(path column, caption column or None) of a Parquet or CSV list."""
    if not columns:
        raise ValueError(f"--input-list {name} has no columns")
    path_column = next((c for c in LIST_PATH_COLUMNS if c in columns), None)
    if path_column is None:
        path_column = columns[0]
        if posixpath.splitext(path_column)[1].lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"--input-list {name}: its first row ({path_column!r}) looks like a path, not a "
                             "header; add a header row (path,caption) or use a .txt list, one path per line")
    caption_column = next((c for c in LIST_CAPTION_COLUMNS if c in columns and c != path_column), None)
    return path_column, caption_column


def _parquet_rows(fs: pafs.FileSystem, path: str, name: str) -> Iterator[tuple[int, Any, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = fs.open_input_file(path)
    try:
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        path_column, caption_column = _pick_columns(name, schema.names)
        path_type = schema.field(path_column).type
        if not (pa.types.is_string(path_type) or pa.types.is_large_string(path_type)
                or getattr(pa.types, "is_string_view", lambda t: False)(path_type)):
            raise ValueError(f"--input-list {name}: column {path_column!r} holds {path_type}, not paths; "
                             f"name the column of paths one of {', '.join(LIST_PATH_COLUMNS)}")
    except (pa.ArrowException, OSError) as exc:
        f.close()
        raise ValueError(f"--input-list {name}: cannot read this Parquet file ({exc})") from exc
    except BaseException:
        f.close()
        raise

    def rows() -> Iterator[tuple[int, Any, Any]]:
        number = 0
        with f:
            columns = [path_column] + ([caption_column] if caption_column else [])
            for batch in parquet.iter_batches(batch_size=8192, columns=columns):
                for entry, caption in _batch_entries(batch, caption_column is not None):
                    number += 1
                    yield number, entry, caption

    return rows()


def _batch_entries(batch: Any, has_caption: bool) -> Iterator[tuple[Any, Any]]:
    """(path, caption) of each row of an Arrow batch whose columns are the path and maybe a caption."""
    paths = batch.column(0).to_pylist()
    return zip(paths, batch.column(1).to_pylist() if has_caption else [None] * len(paths))


def _csv_rows(fs: pafs.FileSystem, path: str, name: str) -> Iterator[tuple[int, Any, Any]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:  # the header first (one block), then the columns used, all read as text
        with fs.open_input_stream(path) as stream:
            columns = pacsv.open_csv(stream).schema.names
    except pa.ArrowInvalid as exc:
        raise ValueError(f"--input-list {name}: cannot read this CSV file ({exc})") from exc
    path_column, caption_column = _pick_columns(name, columns)
    used = [path_column] + ([caption_column] if caption_column else [])
    stream = fs.open_input_stream(path)
    try:
        reader = pacsv.open_csv(stream, convert_options=pacsv.ConvertOptions(
            include_columns=used, column_types={c: pa.string() for c in used}))
    except BaseException:
        stream.close()
        raise

    def rows() -> Iterator[tuple[int, Any, Any]]:
        number = 0
        with stream:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as exc:
                    raise ValueError(f"--input-list {name}: cannot read this CSV file after row {number} "
                                     f"({exc})") from exc
                for entry, caption in _batch_entries(batch, caption_column is not None):
                    number += 1
                    yield number, entry, caption

    return rows()


def _text_rows(fs: pafs.FileSystem, path: str, local: bool) -> Iterator[tuple[int, Any, Any]]:
    f = open(path, "rb") if local else fs.open_input_stream(path)  # a local pipe works too

    def rows() -> Iterator[tuple[int, Any, Any]]:
        with f:
            for number, line in enumerate(f if local else _lines(f), start=1):
                if number == 1:
                    line = line.removeprefix(_BOM)
                text = line.decode("utf-8", "surrogateescape").strip()
                if text and not text.startswith("#"):
                    yield number, text, None

    return rows()


def _lines(stream: Any) -> Iterator[bytes]:
    """The lines of a pyarrow stream (it has no ``readline``), read 1 MiB at a time."""
    rest = b""
    while chunk := stream.read(1 << 20):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _listed_items(rows: Iterator[tuple[int, Any, Any]], name: str, unit: str, root: str | None,
                  stats: ListingStats) -> Iterator[InputItem]:
    previous, first_at = None, 0
    for number, entry, caption in rows:
        where = f"--input-list {name} {unit} {number}"
        source = entry.strip() if isinstance(entry, str) else ""
        if not source:
            raise ValueError(f"{where}: the path is empty")
        is_uri = bool(_SCHEME.match(source))
        if root is not None:
            if is_uri or source.startswith("/"):
                raise ValueError(f"{where}: {printable(source)!r} is an absolute path or URI, but --input {root} "
                                 "was given as the root; list paths relative to it, or leave --input out")
            normal = posixpath.normpath(source)
            if normal == ".." or normal.startswith("../"):
                raise ValueError(f"{where}: {printable(source)!r} leaves the root --input {root}")
        elif not (is_uri or source.startswith("/")):
            raise ValueError(f"{where}: {printable(source)!r} is a relative path and no root was given; pass "
                             "the folder it is relative to as --input, or list absolute paths or URIs")
        shown = printable(source)
        ext = posixpath.splitext(urllib.parse.urlsplit(source).path if is_uri else source)[1]
        problem = None
        if shown != source:
            problem = NOT_UTF8
        elif ext.lower() not in IMAGE_EXTENSIONS:
            problem = (f"not an image file extension ({ext or 'none'}; images end in "
                       f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        if source == previous:
            problem = f"listed twice (first at {unit} {first_at})"
            item_id = row_id(f"{source}\n{unit} {number}")  # an id of its own: ids are unique in a manifest
        else:
            previous, first_at = source, number
            item_id = row_id(source)
        caption_problem = None
        try:
            caption = caption_text(caption, f"{where} caption")
        except CaptionError as exc:
            caption, caption_problem = None, str(exc)
        stamp = _caption_stamp(caption_problem or caption)
        stats.images += 1
        yield InputItem(item_id, shown, None, caption, stamp, problem, "list" if caption is not None else None,
                        caption_problem)


# --- reading sources and sidecars ----------------------------------------------------------------------

class SourceReader:
    """Opens a row's source and sidecar: relative to root, or (root None) absolute paths / URIs of any
    scheme manifests.io.resolve knows, caching one filesystem per scheme+bucket.

    Safe to share between threads; pickles without its cache (a worker resolves again).
    """

    def __init__(self, root: str | None) -> None:
        self.root = root
        self._init_cache()

    def _init_cache(self) -> None:
        self._lock = threading.Lock()
        self._root: tuple[pafs.FileSystem, str] | None = None
        self._filesystems: dict[tuple[str, str], tuple[pafs.FileSystem, str | None, bool]] = {}
        """(scheme, bucket) -> (filesystem, path prefix, unquote); prefix None: resolve each URI."""

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self._init_cache()

    def read(self, source: str) -> bytes:
        """The bytes of a source (or sidecar)."""
        fs, path = self._locate(source)
        if isinstance(fs, pafs.LocalFileSystem):
            with open(path, "rb") as f:
                return f.read()
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_sidecar(self, sidecar: str) -> tuple[str, str | None]:
        """(caption, non-UTF-8 encoding used or None), as ``read_sidecar`` does."""
        return _parse_sidecar(sidecar, self.read(sidecar))

    def read_sidecar_capped(self, sidecar: str, max_chars: int) -> tuple[str, str | None, int]:
        """(caption, non-UTF-8 encoding used or None, its length in characters).

        A text sidecar (``.txt``, ``.caption``) is read only as far as ``max_chars`` characters can
        reach (4 bytes each); the rest of a bigger file (a log saved as a caption) is
        streamed a block at a time only to count its characters, never held. The caption returned
        may then be the beginning only: the caller cuts it to ``max_chars`` and records the length.
        """
        if sidecar.lower().endswith(".json"):  # JSON parses whole
            caption, encoding = self.read_sidecar(sidecar)
            return caption, encoding, len(caption)
        fs, path = self._locate(sidecar)
        limit = 4 * max_chars + 4
        with (open(path, "rb") if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_stream(path)) as f:
            head = f.read(limit)
            if len(head) < limit:
                caption, encoding = _parse_sidecar(sidecar, head)
                return caption, encoding, len(caption)
            encoding = decode_caption(head, complete=False)[1]
            text, chars = _stream_caption(head, iter(lambda: f.read(1 << 20), b""), encoding, max_chars)
        return caption_text(text.strip(), sidecar) or "", encoding, chars

    def _locate(self, source: str) -> tuple[pafs.FileSystem, str]:
        if self.root is not None:
            if self._root is None:
                self._root = resolve(self.root)
            fs, base = self._root
            return fs, os.path.join(base, source) if isinstance(fs, pafs.LocalFileSystem) else join(base, source)
        if not _SCHEME.match(source):
            if not source.startswith("/"):
                raise ValueError(f"{source!r} is relative, and this reader has no root to read it from")
            return _LOCAL, source
        split = urllib.parse.urlsplit(source)
        key = (split.scheme.lower(), split.netloc)
        with self._lock:
            cached = self._filesystems.get(key)
        if cached is None:
            fs, path = resolve(source)
            cached = (fs, None, False)
            for unquote in (True, False):  # the path within the filesystem: a fixed prefix + the URI's path
                tail = urllib.parse.unquote(split.path) if unquote else split.path
                if path.endswith(tail) and not split.query and not split.fragment:
                    cached = (fs, path[:len(path) - len(tail)], unquote)
                    break
            with self._lock:
                self._filesystems.setdefault(key, cached)
            return fs, path
        fs, prefix, unquote = cached
        if prefix is None or split.query or split.fragment:
            return fs, resolve(source)[1]
        return fs, prefix + (urllib.parse.unquote(split.path) if unquote else split.path)


_LOCAL = pafs.LocalFileSystem()


def _stream_caption(head: bytes, rest: Iterator[bytes], encoding: str | None, max_chars: int) -> tuple[str, int]:
    """(the caption's first ``max_chars`` + 1 characters after its leading whitespace, the length of the
    whole caption as a small file's is measured: without leading and trailing whitespace).

    Streams the file's blocks through one decoder and keeps only that much text, so a log saved as a
    caption is counted, never held; whitespace padding neither hides the caption (leading) nor makes a
    whole caption look cut (trailing)."""
    decoder = codecs.getincrementaldecoder(_CODECS[encoding])(errors="replace")
    text, chars, lead, trail = "", 0, 0, 0
    for block in itertools.chain([head], rest, [None]):
        piece = decoder.decode(b"", final=True) if block is None else decoder.decode(block)
        chars += len(piece)
        tail = len(piece) - len(piece.rstrip())
        trail = trail + len(piece) if tail == len(piece) else tail
        if not text:  # still in the leading whitespace
            kept = piece.lstrip()
            lead += len(piece) - len(kept)
            piece = kept
        text += piece[:max_chars + 1 - len(text)]
    return text, chars - lead - trail if text else 0


#: Codec that decodes the rest of a sidecar decoded as ``encoding`` (None: UTF-8).
_CODECS = {None: "utf-8-sig", "utf-16": "utf-16", "cp1252": "cp1252", "latin-1": "latin-1"}


def decode_caption(data: bytes, complete: bool = True) -> tuple[str, str | None]:
    """Caption text from a sidecar's bytes and, when it was not UTF-8, the encoding used instead.

    A caption in a legacy encoding (Windows-1252, Latin-1) keeps its image: it is decoded with
    the first encoding that fits, and the job records which file needed it. ``complete=False``:
    ``data`` is the beginning of a file, whose last character may be cut (it is left out).
    """
    def strict(codec: str) -> str:
        return codecs.getincrementaldecoder(codec)("strict").decode(data, final=complete)

    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with its byte-order mark (Notepad's "Unicode")
        try:
            return strict("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    try:
        return strict("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"  # every byte string decodes


def _parse_sidecar(sidecar: str, data: bytes) -> tuple[str, str | None]:
    """(caption, encoding) of a whole sidecar; a caption that cannot be used raises ``CaptionError``
    (or ``ValueError`` for a JSON sidecar that does not parse), naming the file."""
    text, encoding = decode_caption(data)
    if not sidecar.lower().endswith(".json"):
        return caption_text(text.strip(), sidecar) or "", encoding
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{sidecar} is not valid JSON ({exc}); fix it or write the caption in a .txt") from None
    if not isinstance(record, dict):
        raise CaptionError(f"{sidecar} holds {type(record).__name__}, not a JSON object with a 'caption' or "
                           "'text' field")
    for key in ("caption", "text"):
        if record.get(key) is not None:  # null falls through to the other field
            return (caption_text(record[key], f"{sidecar} field {key!r}") or "").strip(), encoding
    raise CaptionError(f"{sidecar} has no 'caption' or 'text' field")


def read_sidecar(fs: pafs.FileSystem, base: str, sidecar: str) -> tuple[str, str | None]:
    """(caption, encoding used when not UTF-8) of a sidecar; ``.json`` holds it in ``caption`` or ``text``."""
    with fs.open_input_file(join(base, sidecar)) as f:
        return _parse_sidecar(sidecar, f.read())


def read_sidecar_caption(fs: pafs.FileSystem, base: str, sidecar: str) -> str:
    """The caption in a sidecar file."""
    return read_sidecar(fs, base, sidecar)[0]
