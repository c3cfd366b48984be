"""The error type for user mistakes: shown as one line, never a traceback.

`UserError` is defined in tfrecords_schema.errors (the dataset format
stands alone and raises it too, as DatasetError); this is the name the
commands and libraries import.
"""

from tfrecords_schema.errors import UserError  # pylint: disable=unused-import
