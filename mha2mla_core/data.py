"""Text loading shared by calibration and fine-tuning.

One entry point, `load_texts`, reads any text source through `datasets` in streaming mode (nothing is
cached on disk, and `limit_chars` stops reading early, also for a large hub dataset):

- a hub dataset name (`"HuggingFaceFW/fineweb-edu"`), read with `split`;
- a local `.txt` file (one document per file), `.jsonl` / `.jsonl.gz` / `.json`, or `.parquet`; a file with any other
  suffix is read as plain text too (WikiText's `.raw`, `.md`, none), and one that is not UTF-8 text is refused;
- a local directory: every file with one of those suffixes under it, in sorted path order.

s3:// URIs are resolved to local files by the tasks layer before they reach core.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

# file suffix -> `datasets` builder that reads it
_BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}


def load_texts(
    source: str | Path, text_field: str = "text", split: str = "train", limit_chars: int | None = None
) -> list[str]:
    """Read the documents of `source` as a list of strings, in the source's order.

    `limit_chars` caps the total length: documents are taken whole until the cap, the last one cut at it.
    Empty documents are skipped. Raises ValueError when the source has no `text_field` (naming the fields
    it has) or holds no text, FileNotFoundError for a local path that does not exist.
    """
    if limit_chars is not None and limit_chars <= 0:
        raise ValueError(f"limit_chars={limit_chars} must be > 0 (or None for no limit)")
    texts, total = [], 0
    for text in _iter_documents(source, text_field, split):
        if not text:
            continue
        if limit_chars is not None and total + len(text) >= limit_chars:
            texts.append(text[: limit_chars - total])
            break
        texts.append(text)
        total += len(text)
    if not texts:
        raise ValueError(f"{source}: no text found in field {text_field!r} (split={split!r})")
    logger.info("loaded %d documents, %d characters from %s", len(texts), sum(map(len, texts)), source)
    return texts


def _iter_documents(source: str | Path, text_field: str, split: str) -> Iterator[str]:
    path = Path(source)
    if path.exists():
        for file in _local_files(path):
            builder = _BUILDERS.get(_suffix(file), "text")
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            # one stream per file: files of one directory may have different columns
            stream = datasets.load_dataset(builder, data_files=str(file), split="train", streaming=True, **kwargs)
            yield from _texts_of(stream, text_field, str(file))
        return
    if str(source).startswith(("/", "./", "../", "~")) or _suffix(path) in _BUILDERS:
        raise FileNotFoundError(f"{source}: no such file or directory")
    stream = datasets.load_dataset(str(source), split=split, streaming=True)
    yield from _texts_of(stream, text_field, str(source))


def _texts_of(rows: Iterable[dict], text_field: str, where: str) -> Iterator[str]:
    for row in rows:
        if text_field not in row:
            raise ValueError(
                f"{where}: no text field {text_field!r}; its fields are {sorted(row)}; pass text_field=<one of them>"
            )
        yield row[text_field]


def _local_files(path: Path) -> list[Path]:
    """The readable files at `path` (itself, or every supported file under it in sorted path order)."""
    if path.is_file():
        if _suffix(path) not in _BUILDERS:
            _check_plain_text(path)
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in _BUILDERS)
    if not files:
        raise ValueError(f"{path}: no text files in it; supported: {sorted(_BUILDERS)}")
    return files


def is_plain_text(path: Path) -> bool:
    """Whether a local file is read as one plain-text document (`.txt`, or any suffix that is not json/parquet)."""
    return _BUILDERS.get(_suffix(path), "text") == "text"


def _check_plain_text(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if len(head) < (1 << 16) or e.start < len(head) - 4:  # not a multi-byte character cut at the end
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); give a text file or one of "
                             f"{sorted(_BUILDERS)}") from None  # fmt: skip


def _suffix(path: Path) -> str:
    suffixes = path.suffixes[-2:]
    return "".join(suffixes) if "".join(suffixes) in _BUILDERS else path.suffix
