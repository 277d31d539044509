"""`python -m segsr_jax.data.prepare`: shards equal the folder, corrupt files are counted,
parallel and in-process runs agree, finished shards are skipped on resume."""

import json

import numpy as np
import pytest

from segsr_jax.data import prepare as P
from segsr_jax.data import sources as S
from tests.data.test_sources import make_folder


def _examples(source):
    return [source[i] for i in range(len(source))]


def test_parallel_prepare_writes_the_folder_into_shards(tmp_path):
    images, labels, _ = make_folder(tmp_path, n=7, corrupt=(2,))
    manifest = P.prepare(
        str(images), str(labels), str(tmp_path / "out"), records_per_shard=3, workers=2
    )
    assert manifest["num_shards"] == 3 and manifest["records"] == 6
    assert [c[0] for c in manifest["corrupt"]] == ["img02"]
    folder = S.ImageFolderSource(images, labels)
    shards = S.ArrayRecordSource(tmp_path / "out")
    assert len(shards) == 6
    expected = [ex for ex in _examples(folder) if ex is not None]
    for got, want in zip(_examples(shards), expected, strict=True):
        np.testing.assert_array_equal(got["hr"], want["hr"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_resume_skips_finished_shards_and_refuses_another_plan(tmp_path):
    images, _, _ = make_folder(tmp_path, n=5, labels=False)
    out = tmp_path / "out"
    P.prepare(str(images), None, str(out), records_per_shard=2, workers=1)
    names = [P.shard_name(s, 3) for s in range(3)]
    stamps = {n: (out / f"{n}.array_record").stat().st_mtime_ns for n in names}
    # Simulate a run killed while writing shard 1: no summary, a stale temporary file.
    (out / f"{names[1]}.json").unlink()
    (out / f"{names[1]}.array_record").rename(out / f"{names[1]}.array_record.tmp")
    (out / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError):
        S.ArrayRecordSource(out)  # an unfinished folder is never read in part
    manifest = P.prepare(str(images), None, str(out), records_per_shard=2, workers=1)
    assert manifest["records"] == 5 and not (out / f"{names[1]}.array_record.tmp").exists()
    for n in (names[0], names[2]):
        assert (out / f"{n}.array_record").stat().st_mtime_ns == stamps[n]
    assert len(S.ArrayRecordSource(out)) == 5
    with pytest.raises(ValueError, match="another plan"):
        P.prepare(str(images), None, str(out), records_per_shard=4, workers=1)


def test_command_line_reports_corrupt_files(tmp_path, capsys):
    images, labels, _ = make_folder(tmp_path, n=3, corrupt=(0,))
    out = tmp_path / "out"
    args = [
        "--images",
        str(images),
        "--labels",
        str(labels),
        "--output",
        str(out),
        "--workers",
        "1",
    ]
    assert P.main(args) == 0
    captured = capsys.readouterr()
    assert "2 records in 1 shards" in captured.out and "1 corrupt files skipped" in captured.out
    assert "skipped corrupt img00" in captured.err
    assert json.loads((out / "manifest.json").read_text())["labels"] is True
