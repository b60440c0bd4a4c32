"""Reading the official label files: CSV/TXT rows, label values, sex and age.

Every problem is reported with the file, the line (as an editor numbers it,
the header being line 1) and the column, so a user can open the file and look.
"""

import csv
import gzip
import math
import os
import re
from typing import Iterator, Sequence

# Raw label values as the official files write them: positive, negative,
# uncertain ('-1.0' in CheXpert and MIMIC), blank (not mentioned) → NaN.
_LABEL_VALUES = {1.0: 1.0, 0.0: 0.0, -1.0: -1.0}
_AGE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*(y|yr|yrs|year|years|m|month|months|w|d|day|days)?\s*$',
                  re.IGNORECASE)
_AGE_UNIT_YEARS = {'m': 1 / 12, 'month': 1 / 12, 'months': 1 / 12, 'w': 7 / 365.25,
                   'd': 1 / 365.25, 'day': 1 / 365.25, 'days': 1 / 365.25}


class DatasetError(ValueError):
  """A dataset that cannot be prepared as found: a missing file, an empty split."""


class LabelFileError(DatasetError):
  """A problem at a place in a label file."""

  def __init__(self, path: str, reason: str, line: int | None = None,
               column: str | None = None):
    where = path
    if line is not None:
      where += f', line {line}'
    if column is not None:
      where += f', column {column!r}'
    super().__init__(f'{where}: {reason}')
    self.path, self.line, self.column, self.reason = path, line, column, reason


def find_optional(directory: str, *names: str) -> str | None:
  """The first of `names` (or `name.gz`) that exists in `directory`, else None."""
  for name in names:
    for candidate in (name, name + '.gz'):
      path = os.path.join(directory, candidate)
      if os.path.isfile(path):
        return path
  return None


def find_file(directory: str, *names: str) -> str:
  """The first of `names` (or `name.gz`) that exists in `directory`.

  Raises:
    DatasetError: none exists; the message lists what is there.
  """
  path = find_optional(directory, *names)
  if path:
    return path
  try:
    present = sorted(os.listdir(directory))
  except OSError:
    present = []
  shown = ', '.join(present[:20]) + (' ...' if len(present) > 20 else '')
  raise DatasetError(
      f'{directory}: none of {", ".join(names)} found (it holds: {shown or "nothing"})')


def _open_text(path: str):
  if path.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8-sig', newline='')
  return open(path, encoding='utf-8-sig', newline='')


Rows = Iterator[tuple[int, dict[str, str]]]  # (line number, {column: value})


def read_csv(path: str, required: Sequence[str] = ()) -> tuple[list[str], Rows]:
  """Opens a CSV file with a header row, checking its columns first.

  Args:
    path: the file (plain or .gz).
    required: columns that must be in the header (exact names).

  Returns:
    (header, rows): rows yields (line number, {column: value}) lazily.

  Raises:
    LabelFileError: a required column is missing (the message lists the
      columns that are there), or, while iterating, a row is short (naming
      the first column without a value) or has non-empty fields beyond the
      header (naming the field's position).
  """
  with _open_text(path) as f:
    header = next(csv.reader(f), None)
  if header is None:
    raise LabelFileError(path, 'empty file, expected a header row')
  header = [h.strip() for h in header]
  missing = [c for c in required if c not in header]
  if missing:
    raise LabelFileError(path, f'missing column(s) {missing}; the header has {header}', line=1)
  return header, _rows(path, header)


def _rows(path: str, header: list[str]) -> Rows:
  with _open_text(path) as f:
    reader = csv.reader(f)
    next(reader)
    for values in reader:
      if not values or not any(v.strip() for v in values):
        continue  # blank line, often at the end
      if len(values) < len(header):
        raise LabelFileError(path, f'{len(values)} fields, the header has {len(header)}: '
                             f'no value from column {header[len(values)]!r} on',
                             reader.line_num, header[len(values)])
      if len(values) > len(header) and any(v.strip() for v in values[len(header):]):
        # A stray comma (an unquoted value) shifts every later column: refuse
        # rather than read labels from the wrong columns. Empty extra fields
        # (a trailing comma) shift nothing and are ignored.
        extra = next(k for k in range(len(header), len(values)) if values[k].strip())
        raise LabelFileError(path, f'{len(values)} fields, the header has {len(header)}: '
                             f'{values[extra]!r} is beyond the last column, {header[-1]!r} '
                             '(an unquoted comma?)', reader.line_num, f'#{extra + 1}')
      yield reader.line_num, dict(zip(header, values))


def read_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, stripped line) for every non-blank line of a text file."""
  with _open_text(path) as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield number, line.strip()


def parse_label(value: str, path: str, line: int, column: str) -> float:
  """A raw label value: 1, 0, -1 (uncertain) or blank → NaN.

  Raises:
    LabelFileError: any other value, with file, line and column.
  """
  text = value.strip()
  if not text:
    return math.nan
  try:
    number = float(text)
  except ValueError:
    number = math.nan
  if number not in _LABEL_VALUES:
    raise LabelFileError(path, f'label value {value!r} is not 1, 0, -1 or blank', line, column)
  return _LABEL_VALUES[number]


def parse_sex(value: str) -> str:
  """'M', 'F' or '' from the spellings in use ('M', 'Male', 'female', 'O', 'Unknown')."""
  text = value.strip().lower()
  if text in ('m', 'male'):
    return 'M'
  if text in ('f', 'female'):
    return 'F'
  return ''


def parse_age(value: str) -> float:
  """Age in years, NaN when unknown: '57', '057Y' (DICOM), '006M', '35yrs'."""
  match = _AGE.match(value or '')
  if not match:
    return math.nan
  number = float(match[1])
  unit = (match[2] or 'y').lower()
  return number * _AGE_UNIT_YEARS.get(unit, 1.0)
