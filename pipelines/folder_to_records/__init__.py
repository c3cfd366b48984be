"""The build: labelled image folders -> sharded, resized TFRecords (Beam).

  builder.py        the library entry of pipelines.build: checks, lists,
                    runs the pipeline, commits, summarizes
  settings.py       BuildSettings (the flags) and their checks -> BuildConfig
  output_folder.py  what a build owns in --output_dir, its lock, leftovers of
                    stopped builds, the atomic commit
  failures.py       disk failures and Ctrl-C as one line (BuildFailed)
  summary.py        the end-of-build table, classes a model cannot learn
  listing.py        finds class folders and files; every file gets an outcome
  splits.py         stable hash splits and duplicate resolution
  runner_options.py the Beam runner defaults a build adds
  beam_build.py     the Apache Beam graph: read -> convert -> dedupe -> split
                    -> shard -> write; its steps, one job per module:
    build_config.py   BuildConfig, the validated settings the graph runs with
    chunk_format.py   chunk files and their meta files
    shard_math.py     shard layout and arithmetic (prefix sums, shard of a
                      record): the shard planning
    file_io.py        read-ahead, writes, byte-range copies
    listed_files.py   the listed files' runs, cut into chunk pieces
    dofns.py          ListFolder, WriteChunk, resolve_duplicates, ConcatShard
    statistics.py     train mean/std from exact pixel sums
    report_writer.py  metadata.json, build_report.json, rejected.jsonl
"""
