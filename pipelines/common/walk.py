"""The build's walk of a local folder, shared with trainer.predict: which
names are hidden, how a name that is not UTF-8 is shown, and which links
to folders are followed.

A link to a folder is followed when it leads outside the walked root to a
folder not read yet; a link into the root, to one of its parents, to a
folder already read, or into an excluded folder (the build's own output)
is not (it would read images twice, possibly under another label, or loop
forever) and is reported as a Skipped entry.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Iterator, Optional, Sequence, Union

from pipelines.common import paths

# Outcomes (build_report.json counts keys) of what a walk skips.
IGNORED_LINK = 'ignored_folder_link'
UNLISTABLE = 'rejected_unreadable_folder'


@dataclasses.dataclass(frozen=True)
class Skipped:
  """A file left out of a build: `outcome` is a report key (the counts of
  build_report.json, rejected.jsonl), `reason` says why. What the listing
  ignores, what a worker rejects and the copies dedupe drops alike. A
  near-duplicate left out also names the file it is `near` and their hash
  `distance`."""
  relpath: str
  outcome: str
  reason: str
  near: Optional[str] = None
  distance: Optional[int] = None


def is_hidden(name: str) -> bool:
  return name.startswith('.') or name == '__MACOSX'


def escaped(name: str) -> str:
  """A name as text: bytes that are not UTF-8 become \\xNN escapes."""
  return os.fsencode(name).decode('utf-8', 'backslashreplace')


def link_problem(path: str, relpath: str, *, input_real: str,
                 exclude: Sequence[str], seen: set) -> Optional[Skipped]:
  """Why a link to a folder is not followed, or None (then it is read).

  Followed only when it leads outside --input_dir to a folder this walk has
  not read yet; never into the build's own output.
  """
  real = os.path.realpath(path)
  if any(paths.is_within(real, os.path.realpath(e)) for e in exclude):
    return Skipped(
        escaped(relpath), IGNORED_LINK,
        f'link to {escaped(real)}, the --output_dir of this build: not '
        'followed')
  target = os.stat(path)
  if ((target.st_dev, target.st_ino) in seen or
      paths.is_within(real, input_real) or paths.is_within(input_real, real)):
    return Skipped(
        escaped(relpath), IGNORED_LINK,
        f'link to the folder {escaped(real)}, which is inside --input_dir, '
        'one of its parents or already read: not followed (its images would '
        'be read twice or loop)')
  return None


def walk_below(root: str, rel_root: str, *, input_real: str,
                exclude: Sequence[str] = ()) -> Iterator[Union[str, Skipped]]:
  """Files below a local folder, as '/'-separated paths relative to
  --input_dir (rel_root is the folder's), plus unread folders and links.

  A generator: a worker never holds more than one folder's entries.
  os.scandir with str paths never fails on undecodable names (they come back
  with surrogate escapes). Folders are tracked by (device, inode), so no
  folder is read twice in one walk and no link can loop.
  """
  seen = set()
  stack = [(root, rel_root)]
  while stack:
    path, rel = stack.pop()
    try:
      info = os.stat(path)
      seen.add((info.st_dev, info.st_ino))
      with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
      yield Skipped(escaped(rel or '.'), UNLISTABLE,
                        f'cannot list this folder ({e.strerror})')
      continue
    subdirs = []
    for entry in entries:
      relpath = posixpath.join(rel, entry.name) if rel else entry.name
      try:
        is_dir = entry.is_dir()  # Follows links.
      except OSError:
        is_dir = False
      if not is_dir:
        yield relpath  # Broken links too: rejected when read.
        continue
      if entry.is_symlink():
        try:
          problem = link_problem(entry.path, relpath, input_real=input_real,
                                  exclude=exclude, seen=seen)
        except OSError:
          yield relpath
          continue
        if problem:
          yield problem
          continue
        target = os.stat(entry.path)
        seen.add((target.st_dev, target.st_ino))
      subdirs.append((entry.path, relpath))
    stack.extend(reversed(subdirs))


def walk_local(folder: str) -> Iterator[Union[str, Skipped]]:
  """Every file below a local folder, as '/'-separated paths relative to
  it, with the build's link policy (links that lead into the folder, to a
  parent or to a folder already read come back as Skipped, as do
  folders that cannot be listed). For trainer.predict."""
  return walk_below(folder, '', input_real=os.path.realpath(folder))
