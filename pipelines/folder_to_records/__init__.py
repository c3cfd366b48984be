"""The build: labelled image folders -> sharded, resized TFRecords (Beam).

  builder.py      checks flags and folders, runs the pipeline, commits the
                  output atomically (the library entry of pipelines.build)
  listing.py      finds class folders and files; every file gets an outcome
  splits.py       stable hash splits and shard planning
  beam_build.py   the Apache Beam pipeline: read -> convert -> dedupe ->
                  split -> shard -> write, plus build_report.json
"""
