"""Datasets in and out: `hfbatch prepare` (a dataset's rows -> batch lines) and `hfbatch merge` (the answers
joined back onto the rows), local or on the Hub. Needs the `data` extra (pyarrow), imported lazily: nothing of
this package is imported by `submit`.

    source.py   DATA (a file, a folder, hf://datasets/..., owner/name) -> its files (split and config chosen)
    read.py     a dataset's files -> chunks of rows (Parquet row groups, CSV blocks, JSON lines), streamed
    prepare.py  rows -> OpenAI batch lines (custom_id from a column, checked unique, or the row index)
    answers.py  output / error lines -> per-request columns, kept in a SQLite file (the join's disk side)
    merge.py    the rows in their order + the answers' columns -> Parquet, CSV or JSONL
    push.py     the result and a dataset card -> a Hub dataset repo
"""
