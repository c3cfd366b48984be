"""Image-folder -> TFRecord build (Beam), tf.data input layer and CNN trainer."""

import setuptools

setuptools.setup(
    name='image-folder-tfrecords',
    version='0.1.0',
    description=('Labelled image folders -> sharded TFRecords (Apache Beam), '
                 'a fast tf.data input layer, and a Keras CNN trainer.'),
    python_requires='>=3.10,<3.13',
    # The build's per-image measures (hashes, quality) in one compiled pass:
    # ~10x faster than the same steps through Pillow and numpy, and equal to
    # them bit for bit. Optional: without a C compiler the install goes on
    # and the build uses the Pillow/numpy reference (BUILD_NOTES.md).
    ext_modules=[
        setuptools.Extension(
            'pipelines.preprocessing._measures',
            ['pipelines/preprocessing/_measures.c'],
            # Pillow's arithmetic exactly: no fused multiply-add.
            extra_compile_args=['-O3', '-ffp-contract=off'],
            optional=True),
        # The near-duplicate search's work inside a band group: equal to
        # its numpy reference, ~5x faster; optional too.
        setuptools.Extension(
            'pipelines.folder_to_records._near_pairs',
            ['pipelines/folder_to_records/_near_pairs.c'],
            extra_compile_args=['-O3'], optional=True),
    ],
    packages=setuptools.find_packages(
        include=['pipelines', 'pipelines.*', 'trainer', 'trainer.*',
                 'tfrecords_schema', 'tfrecords_schema.*']),
    install_requires=[
        # `tensorflow`, not `tensorflow-cpu`: tf-keras depends on `tensorflow`
        # and the two wheels overwrite each other's files in one environment.
        'tensorflow>=2.21,<2.22',
        'apache-beam>=2.77,<3',
        'tensorflow-datasets>=4.9.10,<5',
        # numpy 2: np.bitwise_count (the near-duplicate search's popcount).
        'numpy>=2.0,<3',
        'absl-py>=2.1,<3',
        'Pillow>=10.4,<13',
        # Strict JPEG decoding: libjpeg only warns about truncated or lying
        # JPEGs (and fills them with grey); Pillow hides those warnings.
        'simplejpeg>=1.8,<2',
        # C crc32c for TFRecord framing in Beam workers without TensorFlow.
        'google-crc32c>=1.5,<2',
        'matplotlib>=3.8,<4',
        # TF 2.21 no longer pulls it in; the trainer writes TensorBoard logs.
        'tensorboard>=2.20,<3',
    ],
    extras_require={
        # Real bundled images for the demo (digits, LFW faces, photos).
        'demo': ['scikit-learn>=1.5,<2', 'scikit-image>=0.24,<1'],
        'test': [
            'pytest>=8,<10',
            # Test files run in parallel processes (scripts/test.sh -n 3):
            # most slow tests wait on the processes they start.
            'pytest-xdist>=3.6,<4',
            # The linter scripts/test.sh runs (configuration: ruff.toml).
            'ruff>=0.6,<1',
            'scikit-learn>=1.5,<2',
            'scikit-image>=0.24,<1',
            # ImageDataGenerator, only as the input benchmark's baseline.
            'tf-keras>=2.21,<2.22',
            # Test-only: the reference the hand-coded pHash is checked against.
            'imagehash>=4.3,<5',
            # Test-only: the reference trainer.mistakes' suspect-label rule
            # is checked against.
            'cleanlab>=2.7,<3',
            # TFDS' store_as_tfds_dataset (the tests prepare a TFDS dataset
            # offline with it) imports it; TFDS does not declare it.
            'importlib_resources>=6,<8',
        ],
        'cuda': ['tensorflow[and-cuda]>=2.21,<2.22'],
    },
)
