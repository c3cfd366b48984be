"""The reader: TFRecords written by the build -> batches for Keras (tf.data).

  input_pipeline.py   make_dataset: read records -> decode -> cache ->
                      shuffle -> batch -> augment -> normalize -> prefetch
  augment.py          seeded batch augmentation (and the same as a layer)
"""
