"""pipeline.tile_table: per-tile records as Parquet, read back equal by this package and by ordinary readers; the
inference manifest keeps its records there and still reads the JSON records of earlier runs."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.inference import MANIFEST, MANIFEST_TABLE, Manifest
from pipeline.jsonfiles import CorruptRecordError
from pipeline.tile_table import read_records, write_records

RECORDS = {
    "31TDJ_r2_c1": {"status": "done", "seen": ["S2A_1", "S1A_2"], "seconds": 1.5, "made_by": "2024-05-01/v1"},
    "31TDJ_r1_c1": {"status": "failed", "reason": "otsu: no valid Sentinel-1 date", "seen": []},
    "31TDJ_r1_c2": {"status": "done", "seen": ["S2A_1"], "seconds": 2.0, "baseline_dates": ["2024-04-01"],
                    "stale": "model: out of memory"},
}


def test_records_round_trip_and_open_in_pandas(tmp_path):
    path = write_records(tmp_path / "t.parquet", RECORDS)
    assert read_records(path) == RECORDS  # fields a row lacks are left out of it again
    assert read_records(path, columns=["status"]) == {t: {"status": r["status"]} for t, r in RECORDS.items()}
    df = pd.read_parquet(path).set_index("tile")
    assert list(df.index) == sorted(RECORDS)  # rows in tile order, whatever order they came in
    assert df.loc["31TDJ_r1_c2", "stale"] == "model: out of memory" and pd.isna(df.loc["31TDJ_r2_c1", "stale"])
    assert list(df.loc["31TDJ_r2_c1", "seen"]) == ["S2A_1", "S1A_2"]
    assert pq.read_schema(path).field("seconds").type == "double"
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, nothing left behind
    assert read_records(write_records(tmp_path / "empty.parquet", {})) == {}


def test_repeated_item_ids_cost_little(tmp_path):
    """10,000 tiles seeing 30 of 400 item ids each: the table is a small fraction of the same records as JSON."""
    ids = [f"S2B_MSIL2A_20240{k % 9 + 1}15T103629_N0510_R008_T31TDJ_{k:04d}" for k in range(400)]
    recs = {f"31TDJ_r{i // 100}_c{i % 100}": {"status": "done", "made_by": "2024-05-01/tiny-head-0123456789",
                                             "seen": ids[(i % 370):(i % 370) + 30]} for i in range(10_000)}
    as_json = len(json.dumps(recs).encode())
    size = write_records(tmp_path / "t.parquet", recs).stat().st_size
    assert size < as_json / 20, (size, as_json)
    assert read_records(tmp_path / "t.parquet") == recs


def test_damaged_table_is_named_with_what_to_do(tmp_path):
    path = write_records(tmp_path / "t.parquet", RECORDS)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptRecordError, match=r"the version's tile table .*t\.parquet.*restore it"):
        read_records(path, "the version's tile table", "restore it")


def test_inference_manifest_keeps_tiles_in_a_table_and_reads_the_json_of_earlier_runs(tmp_path):
    fp = {"task": "landcover", "cube": "c.zarr"}
    m = Manifest(tmp_path / "a", fp, say=lambda s: None)
    m.record("t1", {"status": "done", "file": "tiles/t1.tif", "seconds": 1.0, "worker": 7})
    m.record("t2", {"status": "failed", "reason": "read failed"})
    m.write({"processed": 2})
    doc = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert doc["counts"] == {"done": 1, "failed": 1} and doc["tiles_table"] == MANIFEST_TABLE and "tiles" not in doc
    again = Manifest(tmp_path / "a", fp, say=lambda s: None)
    assert again.tiles == {"t1": {"status": "done", "file": "tiles/t1.tif", "seconds": 1.0, "worker": 7},
                           "t2": {"status": "failed", "reason": "read failed"}}
    # a tile directory written before the table: its records are read from manifest.json
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MANIFEST).write_text(json.dumps({
        "format": "skysense-inference-manifest/1", "fingerprint": fp,
        "tiles": {"t9": {"status": "done", "file": "tiles/t9.tif"}}, "runs": []}))
    old = Manifest(tmp_path / "old", fp, say=lambda s: None)
    assert old.tiles == {"t9": {"status": "done", "file": "tiles/t9.tif"}}
    old.write()
    assert read_records(tmp_path / "old" / MANIFEST_TABLE) == {"t9": {"status": "done", "file": "tiles/t9.tif"}}
