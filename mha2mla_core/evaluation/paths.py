"""Where the evaluation data lives by default, and how text files are read.

The needle's default haystack is the package's own books. The perplexity and multiple-choice defaults point at the
project's shared data checkout (`<repo>/../shared/data`, see its README), the benchmarks' protocol; an installed
package has no such directory: pass explicit paths (the error messages say which option).
"""

from __future__ import annotations

from pathlib import Path

# the package's own public-domain books (mha2mla_core/resources/README.md): the needle's default haystack
PACKAGED_BOOKS = tuple(Path(__file__).resolve().parents[1] / "resources" / name
                       for name in ("calibration_books.txt", "heldout_books.txt"))
SHARED_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WIKITEXT2_TEST = SHARED_DATA_DIR / "text_eval" / "wikitext-2-raw" / "wiki.test.raw"
MC_DATA_DIR = SHARED_DATA_DIR / "mc"
GUTENBERG_DIR = SHARED_DATA_DIR / "text_calib" / "gutenberg"


def read_text(path: str | Path, what: str, fix: str) -> str:
    """The file's text exactly as stored: no newline translation (CRLF stays CRLF), UTF-8.

    `what` names the file's role and `fix` the option that points elsewhere, for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; {fix}")
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def check_fits_context(config, longest: int, extra: int, names: tuple[str, str]) -> None:
    """Raise if `longest` prompt tokens + `extra` generated tokens exceed the model's max_position_embeddings.

    `config` is the model's config (`model.config`, or one read without the weights); `names` = (what the prompt
    lengths are called, what the extra tokens are called), for the message.
    """
    limit = getattr(config, "max_position_embeddings", None)
    need = longest + extra
    if limit is not None and need > limit:
        raise ValueError(
            f"{names[0]} up to {longest} + {names[1]}={extra} = {need} tokens exceed the "
            f"model's max_position_embeddings={limit}; use {names[0]} <= {limit - extra}"
        )
