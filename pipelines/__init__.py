"""Build (Apache Beam) and input (tf.data) pipelines for image folders."""
