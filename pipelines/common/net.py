"""HOST:PORT addresses of tf.data service peers, and whether they answer.

No TensorFlow and no flags: the trainer, the servers and their watchdog
share these.
"""

import re
import socket
from typing import Optional

from pipelines.common.errors import UserError

_ADDRESS = re.compile(r'(?:grpc://)?([^:/\s]+):(\d+)')


def host_port(address: Optional[str], flag: str) -> tuple[str, int]:
  """'grpc://HOST:PORT' or 'HOST:PORT' -> (host, port); a UserError naming
  --flag otherwise."""
  match = _ADDRESS.fullmatch(address or '')
  if not match or not 0 < int(match.group(2)) < 65536:
    raise UserError(f'--{flag}={address} is not grpc://HOST:PORT of a '
                    'tf.data service dispatcher (python -m '
                    'pipelines.data_service dispatcher --port=PORT)')
  return match.group(1), int(match.group(2))


def unreachable(host: str, port: int, timeout: float = 2) -> Optional[str]:
  """None when something accepts TCP connections at host:port, else why
  not (e.g. 'Connection refused')."""
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return None
  except OSError as e:
    return e.strerror or str(e) or type(e).__name__
