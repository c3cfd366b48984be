"""One source of truth for the on-disk format of built datasets."""

from tfrecords_schema.metadata import DatasetError
from tfrecords_schema.metadata import DatasetSpec
from tfrecords_schema.metadata import read_dataset_spec
from tfrecords_schema.metadata import SplitSpec
from tfrecords_schema.metadata import write_dataset_metadata
from tfrecords_schema.report import BuildReport
from tfrecords_schema.report import read_build_report
from tfrecords_schema.schema import decode_image
from tfrecords_schema.schema import encode_example
from tfrecords_schema.schema import parse_examples
from tfrecords_schema.schema import SCHEMA_VERSION
