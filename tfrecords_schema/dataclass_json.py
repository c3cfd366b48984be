"""Frozen dataclasses <-> JSON values, driven by the fields' type hints.

The JSON files a build writes (build_report.json, metadata.json) are typed
dataclasses here: a field added to one is written and read back with no
other change. Keys are the field names, in field order (a field may name
another key, e.g. 'class', with `json_key`). Supported types: str, int,
float, bool, Any, nested dataclasses, Optional[X], tuple[X, ...], list[X],
dict[str, X] (Mapping[str, X]).

Reading is strict on types (ValueError naming the key) and lenient on
absence: a missing key takes the field's default (or its read_default, for
a field the writer must always give), so a partial file (a test's, an
older build's) still reads; a missing key without either is an error.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import types
import typing
from typing import Any, Callable, Optional

# Field metadata keys.
JSON_KEY = 'json_key'  # The key in the JSON object (default: the field name).
OMIT_IF = 'omit_if'  # value -> True: the key is left out of the JSON.
IN_FILE = 'in_file'  # False: never written by to_json_dict(in_file=True).
# A value for a key missing from the JSON, for a field the writer must give
# (no dataclass default): a callable returning it.
READ_DEFAULT = 'read_default'


def field(*, json_key: Optional[str] = None,
          omit_if: Optional[Callable[[Any], bool]] = None,
          in_file: bool = True,
          read_default: Optional[Callable[[], Any]] = None, **kwargs) -> Any:
  """dataclasses.field(...) with this module's metadata."""
  metadata = dict(kwargs.pop('metadata', None) or {})
  if read_default is not None:
    metadata[READ_DEFAULT] = read_default
  if json_key is not None:
    metadata[JSON_KEY] = json_key
  if omit_if is not None:
    metadata[OMIT_IF] = omit_if
  if not in_file:
    metadata[IN_FILE] = False
  return dataclasses.field(metadata=metadata, **kwargs)


def is_none(value: Any) -> bool:
  return value is None


def json_key(f: dataclasses.Field) -> str:
  return f.metadata.get(JSON_KEY, f.name)


def to_json_value(value: Any, *, in_file: bool = True) -> Any:
  """A dataclass (or a value inside one) as plain JSON values.

  in_file: leave out the fields marked in_file=False.
  """
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    out = {}
    for f in dataclasses.fields(value):
      item = getattr(value, f.name)
      if in_file and not f.metadata.get(IN_FILE, True):
        continue
      if f.metadata.get(OMIT_IF, lambda _: False)(item):
        continue
      out[json_key(f)] = to_json_value(item, in_file=in_file)
    return out
  if isinstance(value, collections.abc.Mapping):
    return {k: to_json_value(v, in_file=in_file) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json_value(v, in_file=in_file) for v in value]
  return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
  return typing.get_type_hints(cls)


def from_json_value(tp: Any, raw: Any, where: str) -> Any:
  """raw (parsed JSON) as type tp; ValueError naming `where` when it is not
  one."""
  if dataclasses.is_dataclass(tp):
    return from_json_dict(tp, raw, where)
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if raw is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) != 1:
      raise TypeError(f'{where}: unsupported type {tp}')
    return from_json_value(inner[0], raw, where)
  if origin is tuple:
    return tuple(from_json_value(args[0], v, f'{where}[{i}]')
                 for i, v in enumerate(_expect(raw, list, where)))
  if origin is list:
    return [from_json_value(args[0], v, f'{where}[{i}]')
            for i, v in enumerate(_expect(raw, list, where))]
  if origin in (dict, collections.abc.Mapping):
    return {_expect(k, str, where): from_json_value(args[1], v,
                                                    f'{where}.{k}')
            for k, v in _expect(raw, dict, where).items()}
  if tp is Any:
    return raw
  if tp is float:  # An int stays an int: the same JSON when written back.
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
      raise ValueError(f'{where} is {raw!r}, not a number')
    return raw
  if tp in (int, str, bool):
    if isinstance(raw, bool) != (tp is bool) or not isinstance(raw, tp):
      raise ValueError(f'{where} is {raw!r}, not a {tp.__name__}')
    return raw
  raise TypeError(f'{where}: unsupported type {tp}')


def _expect(raw: Any, tp: type, where: str) -> Any:
  if not isinstance(raw, tp):
    raise ValueError(f'{where} is {raw!r}, not a JSON '
                     f'{"list" if tp is list else "object" if tp is dict else "string"}')
  return raw


def from_json_dict(cls: type, raw: Any, where: str = '') -> Any:
  """A cls from its JSON object: keys it lacks take the field defaults,
  keys it does not know are ignored."""
  _expect(raw, dict, where or cls.__name__)
  hints = _hints(cls)
  values = {}
  for f in dataclasses.fields(cls):
    key = json_key(f)
    at = f'{where}.{key}' if where else key
    if key in raw:
      values[f.name] = from_json_value(hints[f.name], raw[key], at)
    elif READ_DEFAULT in f.metadata:
      values[f.name] = f.metadata[READ_DEFAULT]()
    elif (f.default is dataclasses.MISSING and
          f.default_factory is dataclasses.MISSING):
      raise ValueError(f'{at} is missing')
  return cls(**values)
