"""MetricsWriter / read_metrics / AsyncFetcher: the log equals what was written, resumes exactly."""
import glob
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from worldlm_jax.outputs.metrics import AsyncFetcher, MetricsWriter, flatten_scalars, read_metrics


def record(r):
    return {"round": r, "loss": 1.0 / (r + 1), "lr": 0.1,
            "eval": {"perplexity": 10.0 - r, "per_federation": {"en": 9.0 - r, "de": 11.0}},
            "attention": [[0.5, 0.5]], "note": "text"}


def read_event_file(path):
    """The Event protos of one TFRecord file (u64 length, u32 crc, data, u32 crc)."""
    data, pos, events = open(path, "rb").read(), 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


def read_events(tb_dir):
    """(tag, step, value) of every scalar in the event files under tb_dir."""
    return [(v.tag, event.step, v.simple_value)
            for path in sorted(glob.glob(f"{tb_dir}/events.out.tfevents.*"))
            for event in read_event_file(path) for v in event.summary.value]


def test_jsonl_lines_equal_records(tmp_path):
    records = [record(r) for r in range(3)]
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for rec in records:
            writer.write(rec)
    assert read_metrics(tmp_path / "metrics.jsonl") == records
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert not (tmp_path / "tb").exists()


def test_numpy_values_are_logged_as_python(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write({"round": 0, "loss": np.float32(0.5), "hist": np.arange(3)})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"round": 0, "loss": 0.5,
                                                         "hist": [0, 1, 2]}]


def test_each_line_is_flushed_before_close(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(record(0))
    assert read_metrics(tmp_path / "metrics.jsonl") == [record(0)]
    writer.close()


def test_record_without_round_is_rejected(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="integer 'round'"):
            writer.write({"loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_resume_matches_uninterrupted_run(tmp_path):
    """Killed after round 4 (mid-line) with a checkpoint at round 2: resume from 3."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with MetricsWriter(straight, tensorboard=False) as writer:
        for r in range(6):
            writer.write(record(r))
    with MetricsWriter(resumed, tensorboard=False) as writer:
        for r in range(5):
            writer.write(record(r))
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"round": 5, "lo')  # torn write of a killed run
    assert [rec["round"] for rec in read_metrics(resumed / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    with MetricsWriter(resumed, tensorboard=False) as writer:
        writer.truncate_after(2)
        assert [rec["round"] for rec in read_metrics(resumed / "metrics.jsonl")] == [0, 1, 2]
        for r in range(3, 6):
            writer.write(record(r))
    assert (resumed / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()


def test_garbled_line_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_tensorboard_scalars_flattened(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for r in range(2):
            writer.write(record(r))
    events = read_events(tmp_path / "tb")
    tags = {tag for tag, _, _ in events}
    assert tags == {"loss", "lr", "eval/perplexity", "eval/per_federation/en",
                    "eval/per_federation/de"}
    assert ("eval/per_federation/en", 1, 8.0) in events


def test_truncate_writes_purge_marker(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(record(0))
        writer.truncate_after(0)
        writer.write(record(1))
    (resumed,) = glob.glob(f"{tmp_path}/tb/events.out.tfevents.*.resume1")
    starts = [e.step for e in read_event_file(resumed)
              if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [1]  # TensorBoard hides older events with step >= 1
    events = read_events(tmp_path / "tb")
    assert ("loss", 0, 1.0) in events and ("loss", 1, 0.5) in events


def test_flatten_scalars_skips_non_scalars():
    tree = {"a": {"b": 1, "c": [1.0], "d": "x", "e": True}, "f": np.float64(2.5)}
    assert list(flatten_scalars(tree)) == [("a/b", 1.0), ("f", 2.5)]


def test_async_fetcher_returns_values_in_order():
    fetcher = AsyncFetcher(lag=1)
    submitted, got = [], []
    for r in range(4):
        tree = {"round": r, "loss": jnp.float32(r) / 4,
                "per_fed": jnp.arange(3, dtype=jnp.float32) * r}
        submitted.append(tree)
        ready = fetcher.submit(tree)
        assert len(ready) == (0 if r == 0 else 1)  # round r-1 comes back when r is submitted
        got += ready
    assert len(fetcher) == 1
    got += fetcher.flush()
    assert len(fetcher) == 0 and fetcher.flush() == []
    assert [g["round"] for g in got] == [0, 1, 2, 3]
    for want, have in zip(submitted, got):
        assert isinstance(have["loss"], float) and have["loss"] == float(want["loss"])
        assert have["per_fed"] == np.asarray(want["per_fed"]).tolist()


def test_async_fetcher_lag_zero_is_synchronous():
    fetcher = AsyncFetcher(lag=0)
    assert fetcher.submit({"x": jnp.int32(3)}) == [{"x": 3}]
    with pytest.raises(ValueError, match="lag"):
        AsyncFetcher(lag=-1)
