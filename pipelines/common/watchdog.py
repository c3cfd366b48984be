"""A watchdog process: bounded waits and signals that always stop us.

TensorFlow blocks inside C++ while holding Python's interpreter lock in
places where a peer can make it wait forever: a tf.data service worker
registering with a dispatcher that is not there, an iterator waiting for a
dispatcher that was killed, MultiWorkerMirroredStrategy waiting for every
worker. While it blocks, no Python signal handler and no thread of this
process runs, so neither a Python timeout nor SIGTERM/SIGINT can end it.

A small helper process (no TensorFlow, started in ~30 ms) does it instead:

* deadlines: `arm(seconds, message)` makes the helper print `message` and
  kill this process (SIGKILL, exit status 137) unless `arm` or `clear` is
  called again first; an optional earlier note (`note_after`) is printed
  once and the wait goes on. `arm` again is a heartbeat.
* peers: `watch_peer(host, port, ...)` makes the helper try a TCP connection
  every second; when none succeeds for `seconds`, it prints the message and
  kills this process.
* signals: SIGTERM and SIGINT still run this process's Python handlers (a
  preemption stops after the current step), but the signal is also written
  to a pipe the helper reads (`signal.set_wakeup_fd`, done by the C-level
  handler even while the lock is held). If this process has not ended
  `grace_s` seconds later, the helper prints one line and kills it; a
  second signal of the same kind kills it at once.

The helper ignores SIGINT and SIGTERM itself (a Ctrl-C reaches the whole
process group) and exits when this process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Optional

_HELPER = r'''
import json, os, select, signal, socket, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
parent, control, wakeup = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
stops = {int(k): v for k, v in json.loads(sys.argv[4]).items()}
err = sys.stderr
deadline = note_at = note = message = None
peer = None  # (host, port, seconds, message, last_ok)
kill_at = kill_line = None
buffer = b''

def say(line):
  err.write(line + '\n')
  err.flush()

def kill(line):
  say(line)
  try:
    os.kill(parent, signal.SIGKILL)
  except ProcessLookupError:
    pass
  sys.exit(0)

def reachable(host, port):
  try:
    socket.create_connection((host, port), timeout=1).close()
    return True
  except OSError:
    return False

fds = [control] + ([wakeup] if wakeup >= 0 else [])
while True:
  ready, _, _ = select.select(fds, [], [], 0.5)
  if os.getppid() != parent:
    sys.exit(0)
  now = time.monotonic()
  if control in ready:
    data = os.read(control, 65536)
    if not data:
      sys.exit(0)  # The parent closed its end: it is done.
    buffer += data
    while b'\n' in buffer:
      line, buffer = buffer.split(b'\n', 1)
      command = json.loads(line)
      kind = command['do']
      if kind == 'arm':
        deadline = now + command['seconds']
        message = command['message']
        if command.get('note_after') is not None:
          if note_at is None or command.get('reset_note', True):
            note_at = now + command['note_after']
          note = command['note']
      elif kind == 'clear':
        deadline = note_at = note = message = None
      elif kind == 'peer':
        peer = [command['host'], command['port'], command['seconds'],
                command['message'], now]
      elif kind == 'no_peer':
        peer = None
  if wakeup >= 0 and wakeup in ready:
    for byte in os.read(wakeup, 512):
      if byte not in stops:
        continue
      grace, line = stops[byte]
      if kill_at is not None and kill_line == line:
        kill(line)  # The same signal twice: at once.
      kill_at, kill_line = now + grace, line
  if kill_at is not None and now >= kill_at:
    kill(kill_line)
  if note_at is not None and now >= note_at:
    if peer is None or reachable(peer[0], peer[1]):
      say(note)  # (A peer that is gone gets its own line.)
    note_at = None
  if deadline is not None and now >= deadline:
    kill(message)
  if peer is not None:
    host, port, seconds, peer_message, last_ok = peer
    if reachable(host, port):
      peer[4] = time.monotonic()
    elif time.monotonic() - last_ok >= seconds:
      kill(peer_message)
'''


class Watchdog:
  """The helper process of this process (see the module docstring).

  Args:
    stops: signal -> (grace seconds, the line printed when the process is
      killed after that grace). Those signals must have a Python handler
      (SIGINT has one by default) for the helper to hear of them.
    stderr: the file descriptor the helper prints to (the real stderr).
  """

  def __init__(self, stops: dict[int, tuple[float, str]], *,
               stderr: Optional[int] = None):
    read_control, self._control = os.pipe()
    read_wakeup, write_wakeup = os.pipe()
    os.set_blocking(write_wakeup, False)
    self._process = subprocess.Popen(
        [sys.executable, '-c', _HELPER, str(os.getpid()), str(read_control),
         str(read_wakeup),
         json.dumps({int(s): list(v) for s, v in stops.items()})],
        pass_fds=(read_control, read_wakeup), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr if stderr is not None else sys.stderr.fileno())
    os.close(read_control)
    os.close(read_wakeup)
    self._wakeup = write_wakeup
    self._previous_wakeup = None
    try:
      self._previous_wakeup = signal.set_wakeup_fd(
          write_wakeup, warn_on_full_buffer=False)
    except ValueError:  # Not the main thread: deadlines only.
      pass

  def _send(self, **command) -> None:
    try:
      os.write(self._control, (json.dumps(command) + '\n').encode())
    except OSError:
      pass  # The helper is gone: nothing left to bound.

  def arm(self, seconds: float, message: str, *,
          note_after: Optional[float] = None, note: str = '',
          reset_note: bool = True) -> None:
    """Kill this process with `message` unless re-armed or cleared within
    `seconds`; print `note` once after `note_after` seconds without a
    re-arm (reset_note=False keeps an earlier note's clock running)."""
    self._send(do='arm', seconds=seconds, message=message,
               note_after=note_after, note=note, reset_note=reset_note)

  def clear(self) -> None:
    self._send(do='clear')

  def watch_peer(self, host: str, port: int, *, seconds: float,
                 message: str) -> None:
    """Kill this process with `message` once host:port has refused TCP
    connections for `seconds` in a row."""
    self._send(do='peer', host=host, port=int(port), seconds=seconds,
               message=message)

  def forget_peer(self) -> None:
    self._send(do='no_peer')

  def close(self) -> None:
    """Stops the helper (this process is ending normally)."""
    if self._previous_wakeup is not None:
      try:
        signal.set_wakeup_fd(self._previous_wakeup)
      except ValueError:
        pass
    for fd in (self._control, self._wakeup):
      try:
        os.close(fd)
      except OSError:
        pass
    try:
      self._process.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()

  def __enter__(self) -> 'Watchdog':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
