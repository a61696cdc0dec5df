#!/usr/bin/env python3
"""Writes the Parquet dataset fixtures of `flywheel ingest --parquet`'s tests
(tests/fixtures/datasets/): four GSM8K-style rows, the third without an answer, in pyarrow's
default compression (snappy) and in zstd (polars' default).

    python3 -m venv /tmp/pa && /tmp/pa/bin/pip install pyarrow
    /tmp/pa/bin/python scripts/dataset_fixtures.py
"""

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = {
    "question": [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?",
        "What is $1+1$?",
        "A row whose answer is missing.",
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
        "babysitting. How much did she earn?",
    ],
    "answer": [
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72",
        "It is $\\boxed{2}$.",
        None,
        "Weng earns 12/60 = $0.2 per minute.\nShe earned 0.2 x 50 = $10.\n#### 10",
    ],
}

out = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/datasets"
out.mkdir(parents=True, exist_ok=True)
table = pa.table(ROWS)
for codec in ["snappy", "zstd"]:
    pq.write_table(table, out / f"gsm8k-{codec}.parquet", compression=codec)
    print(out / f"gsm8k-{codec}.parquet")
