"""Image folders -> TFRecords -> batches: the data side of the toolkit.

The flow, one sub-package per hop:

  folder_to_records/    Apache Beam build (`python -m pipelines.build`):
                        list the class folders, convert each file, split,
                        dedupe, write sharded TFRecords + metadata.json
  records_to_batches/   tf.data reader: TFRecords -> decoded, augmented,
                        normalized batches for Keras (`make_dataset`)
  preprocessing/        the one definition of what an image goes through,
                        shared by the build, the reader, the trainer's
                        pictures, the serving export and trainer.predict
  common/               CLI helpers and the user-error type (no Beam, no
                        TensorFlow: the trainer's start-up stays fast)
  plots.py              every PNG the toolkit writes
  sample_data.py        the real labelled images bundled in packages (demo)

The record format itself lives in the top-level `tfrecords_schema` package.
"""
