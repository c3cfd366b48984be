"""One progress display for a build, from its workers' chunk lines.

Each chunk a worker finishes prints `[build] chunk N: W written, R rejected`
(dofns.WriteChunk), in whatever order the workers finish. The command's
stderr forwarder (pipelines.common.cli) hands those lines here instead of
showing them: on a terminal one line is rewritten in place with the running
totals and the rate, as tqdm and Keras do; elsewhere (a log, a pipe) the
totals are printed as a line at most every EVERY_S seconds. Every other
line still goes through, after the progress line is ended.
"""

from __future__ import annotations

import re
import time
from typing import Callable, Optional

_CHUNK = re.compile(rb'^\[build\] chunk \d+: (\d+) written, (\d+) rejected$')

# Seconds between progress lines when stderr is not a terminal.
EVERY_S = 10.0


class ChunkProgress:
  """Running totals of the chunk lines (bytes in, bytes to write out)."""

  def __init__(self, *, terminal: bool,
               clock: Callable[[], float] = time.monotonic):
    self._terminal, self._clock = terminal, clock
    # (time, files) at the first chunk line: the rate counts from there
    # (the start of the process is seconds of imports and listing).
    self._first: Optional[tuple[float, int]] = None
    self._last: Optional[float] = None
    self._open = False  # A terminal line is shown and not ended yet.
    self.written = self.rejected = 0

  def consume(self, line: bytes) -> Optional[bytes]:
    """None for a line that is no chunk line; else what to write now
    (possibly nothing)."""
    match = _CHUNK.match(line.rstrip(b'\n'))
    if not match:
      return None
    self.written += int(match[1])
    self.rejected += int(match[2])
    now = self._clock()
    if self._first is None:
      self._first = (now, self.written + self.rejected)
    if self._terminal:
      self._open = True
      return b'\r' + self._text(now) + b'\x1b[K'
    if self._last is None or now - self._last >= EVERY_S:
      self._last = now
      return self._text(now) + b'\n'
    return b''

  def end_line(self) -> bytes:
    """What to write before any other line: ends a shown terminal line."""
    if not self._open:
      return b''
    self._open = False
    return b'\n'

  def _text(self, now: float) -> bytes:
    done = self.written + self.rejected
    text = (f'[build] {done:,} files read: {self.written:,} written, '
            f'{self.rejected:,} rejected')
    since, before = self._first
    if now - since >= 0.5:
      text += f' ({(done - before) / (now - since):,.0f} files/s)'
    return text.encode()
