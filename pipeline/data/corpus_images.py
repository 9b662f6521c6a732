"""The embedded corpus's images: one uncompressed zip archive, ``data/corpus/images.zip``, whose
members are named by their URL path (``images/<key>.jpg``, as in ``pairs.parquet``).

One file rather than 20,000: DVC hashes each file of an output and links it into its cache
(7-8 s for the loose files, on the critical path of every fresh run), and a stage that
commits its output fsyncs each one. The corpus stage writes the archive (pipeline/data/corpus.py);
the crawl's loopback server reads it (pipeline/data/server.py).
"""
from __future__ import annotations

import threading
import zipfile
from pathlib import Path

from ..errors import StageError

IMAGES = "images.zip"


class CorpusImages:
    """The corpus's images, by their URL path (``images/<key>.jpg``, as in ``pairs.parquet``), read
    from ``images.zip``; safe to share between threads (the crawl's server reads it from many)."""

    def __init__(self, corpus_dir: Path):
        path = Path(corpus_dir) / IMAGES
        try:
            self._zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as err:
            raise StageError(f"{path}: not a readable corpus image archive ({err}): run the corpus stage again") from None
        self.names = frozenset(self._zip.namelist())
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> bytes:
        """The bytes of member ``name``; KeyError when there is none."""
        if name not in self.names:
            raise KeyError(name)
        with self._lock:
            return self._zip.read(name)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "CorpusImages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
