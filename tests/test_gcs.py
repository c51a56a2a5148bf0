"""gs:// paths against a local GCS emulator (tests/gcs_emulator.py), one test per storage layer.

Layers: etils.epath through fsspec/gcsfs (the TensorFlow-free route: text, JSON, .npz/.npy,
directory operations), orbax's CheckpointManager (tensorstore's gcs kvstore for arrays, epath for
step directories and metadata), TensorBoard event files written through epath, TensorFlow's own
GCS filesystem (tf.io.gfile, clu's SummaryWriter, epath's TensorFlow backend) in a child process
that inherits the emulator's variables, and how quickly a missing object, a missing bucket or an
unreachable endpoint fails.
"""

import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest



@pytest.fixture
def root(gcs_bucket):  # pylint: disable=redefined-outer-name
  """A fresh prefix of the shared bucket for one test."""
  return epath.Path(gcs_bucket) / f"t-{uuid.uuid4().hex[:8]}"


def _child(script: str, timeout: float = 120) -> dict:
  """Runs `script` in a fresh Python (the emulator's variables inherited); its last line is JSON."""
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ))
  assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_epath_files_roundtrip(root):
  config = {"model": {"channels": [16, 32]}, "lr": 1e-3}
  (root / "config.json").write_text(json.dumps(config))
  assert json.loads((root / "config.json").read_text()) == config

  with (root / "nested" / "stats.json").open("w") as f:
    json.dump({"fid": 4.25}, f)
  assert json.loads((root / "nested" / "stats.json").read_text()) == {"fid": 4.25}

  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  labels = np.arange(3, dtype=np.int32)
  with (root / "samples" / "samples.npz").open("wb") as f:
    np.savez(f, images=images, labels=labels)
  with (root / "samples" / "samples.npz").open("rb") as f:  # np.load seeks in the remote file
    loaded = np.load(f)
    np.testing.assert_array_equal(loaded["images"], images)
    np.testing.assert_array_equal(loaded["labels"], labels)

  weights = rng.normal(size=(4, 5)).astype(np.float16)
  with (root / "w.npy").open("wb") as f:
    np.save(f, weights)
  np.testing.assert_array_equal(np.load(io.BytesIO((root / "w.npy").read_bytes())), weights)
  assert (root / "w.npy").stat().length == len((root / "w.npy").read_bytes())


def test_epath_directory_operations(root):
  assert not root.exists()
  # An object store has no directories: gcsfs's mkdir leaves nothing until a file is written.
  (root / "empty").mkdir(parents=True, exist_ok=True)
  assert not (root / "empty").exists()

  for name in ("a.json", "b.json", "c.txt"):
    (root / "d" / name).write_text(name)
  assert root.exists() and root.is_dir() and (root / "d").is_dir()
  assert sorted(p.name for p in (root / "d").iterdir()) == ["a.json", "b.json", "c.txt"]
  assert sorted(p.name for p in (root / "d").glob("*.json")) == ["a.json", "b.json"]
  assert all(os.fspath(p).startswith("gs://") for p in (root / "d").glob("*"))

  (root / "d" / "a.json").rename(root / "d" / "moved.json")
  assert not (root / "d" / "a.json").exists()
  assert (root / "d" / "moved.json").read_text() == "a.json"
  with pytest.raises(FileExistsError):
    (root / "d" / "b.json").rename(root / "d" / "moved.json")

  with pytest.raises(NotImplementedError, match="Recursive"):  # epath refuses ** on gs://
    list(root.glob("**/*.json"))

  (root / "d").rmtree()
  assert not (root / "d").exists() and not root.exists()


def test_epath_append_is_overwrite_on_gcs(root):
  """gcsfs opens 'a' as 'w' (a GCS object cannot grow): appenders must rewrite the object."""
  path = root / "metrics.jsonl"
  with pytest.warns(UserWarning, match="Append mode"):
    with path.open("a") as f:
      f.write('{"step": 1}\n')
  with pytest.warns(UserWarning, match="Append mode"):
    with path.open("a") as f:
      f.write('{"step": 2}\n')
  assert path.read_text() == '{"step": 2}\n'


def test_orbax_checkpoint_manager(root):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def state(step):
    return {"params": {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2) * step, rows),
                       "b": jax.device_put(jnp.full((3,), step, jnp.bfloat16), replicated)},
            "opt": (jax.device_put(jnp.ones((8, 2)) / step, rows),),
            "step": jax.device_put(jnp.asarray(step, jnp.int32), replicated)}

  directory = root / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  with ocp.CheckpointManager(directory, options=options) as manager:
    for step in (1, 2, 3):
      manager.save(step, args=ocp.args.StandardSave(state(step)))
      manager.wait_until_finished()
    assert manager.latest_step() == 3
    assert manager.all_steps() == [2, 3]  # step 1 deleted from the bucket (max_to_keep)

  assert sorted(p.name for p in directory.iterdir()) == ["2", "3"]
  assert (directory / "3" / "_CHECKPOINT_METADATA").exists()

  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state(1))
  with ocp.CheckpointManager(directory) as manager:
    assert manager.latest_step() == 3
    restored = manager.restore(3, args=ocp.args.StandardRestore(target))
  expected = state(3)
  assert isinstance(restored["opt"], tuple)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    assert got.dtype == want.dtype and got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


class _EpathEventWriter:
  """A TensorBoard event file written through epath (the TensorFlow-free route).

  A GCS object is immutable and appears only when complete, so each flush writes the whole
  file again (what TensorFlow's GCS writer does too).
  """

  def __init__(self, logdir: epath.Path):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._buffer = io.BytesIO()
    self._records = record_writer.RecordWriter(self._buffer)
    self._records.write(event_pb2.Event(wall_time=time.time(),
                                        file_version="brain.Event:2").SerializeToString())

  def write_scalars(self, step: int, scalars: dict) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                  summary=summary_pb2.Summary(value=values))
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self.path.write_bytes(self._buffer.getvalue())


def _read_scalars(files, local_dir):
  """{tag: [(step, value)]} of event files, read by TensorBoard's EventAccumulator."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  local_dir.mkdir()
  for f in files:
    (local_dir / f.name).write_bytes(f.read_bytes())
  acc = event_accumulator.EventAccumulator(str(local_dir))
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_through_epath(root, tmp_path):
  logdir = root / "tb"
  writer = _EpathEventWriter(logdir)
  for step in range(3):
    writer.write_scalars(step, {"loss": 1.0 / (step + 1)})
  writer.flush()
  assert _read_scalars(list(logdir.iterdir()), tmp_path / "a") == {
      "loss": [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]}
  writer.write_scalars(3, {"loss": 0.25, "lr": 1e-3})
  writer.flush()
  got = _read_scalars(list(logdir.iterdir()), tmp_path / "b")
  assert [s for s, _ in got["loss"]] == [0, 1, 2, 3] and got["lr"] == [(3, pytest.approx(1e-3))]


def _dead_endpoint() -> str:
  """host:port on 127.0.0.1 where nothing listens."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"127.0.0.1:{s.getsockname()[1]}"


def test_tensorflow_gcs_filesystem(root):
  """tf.io.gfile, clu's SummaryWriter and epath's TensorFlow backend, in a child process.

  Last, with the endpoint gone, TensorFlow fails within its bounded retries (GCS_RETRY_CONFIG_*).
  """
  (root / "from_gcsfs.txt").write_text("written by gcsfs")
  dead = _dead_endpoint()
  out = _child(f"""
      import json, os, time
      import tensorflow as tf
      from clu import metric_writers
      from etils import epath
      from tensorboard.backend.event_processing import event_accumulator

      root = "{root}"
      t0 = time.time()
      result = {{"seen": tf.io.gfile.GFile(root + "/from_gcsfs.txt").read()}}
      with tf.io.gfile.GFile(root + "/tf/a.txt", "w") as f:
        f.write("written by tf")
      result["listdir"] = sorted(tf.io.gfile.listdir(root + "/tf"))

      writer = metric_writers.SummaryWriter(root + "/tb")
      for step in range(3):
        writer.write_scalars(step, {{"loss": 0.5 * step}})
      writer.flush()
      writer.close()
      acc = event_accumulator.EventAccumulator(root + "/tb")
      acc.Reload()
      result["loss"] = [[e.step, float(tf.make_ndarray(e.tensor_proto))] for e in acc.Tensors("loss")]

      os.environ["EPATH_USE_TF"] = "true"
      p = epath.Path(root) / "epath_tf" / "m.jsonl"
      with p.open("a") as f:
        f.write("1\\n")
      with p.open("a") as f:
        f.write("2\\n")
      result["epath_tf_backend"] = type(p._backend).__name__
      result["appended"] = p.read_text()
      result["seconds"] = time.time() - t0

      os.environ["HTTPS_PROXY"] = os.environ["https_proxy"] = "http://{dead}"  # endpoint gone
      t = time.time()
      try:
        tf.io.gfile.exists(root + "/never_seen.txt")
      except Exception as e:
        result["unreachable"] = [type(e).__name__, str(e)[:200], time.time() - t]
      print(json.dumps(result))
      """)
  assert out["seen"] == "written by gcsfs"
  assert out["listdir"] == ["a.txt"]
  assert out["loss"] == [[0, 0.0], [1, 0.5], [2, 1.0]]
  assert out["epath_tf_backend"] == "_TfBackend"
  assert out["appended"] == "1\n2\n"  # TensorFlow's GCS filesystem appends; gcsfs does not
  assert (root / "tf" / "a.txt").read_text() == "written by tf"
  assert (root / "epath_tf" / "m.jsonl").read_text() == "1\n2\n"
  assert out["seconds"] < 30
  name, message, seconds = out["unreachable"]
  assert name == "AbortedError" and "retry attempts failed" in message and seconds < 10, out


def _fails_within(seconds, exc, fn, match=None):
  start = time.monotonic()
  with pytest.raises(exc, match=match) as info:
    fn()
  elapsed = time.monotonic() - start
  assert elapsed < seconds, f"{fn} took {elapsed:.1f} s to fail"
  return info.value


def test_missing_object_and_bucket_fail_fast(root, gcs_bucket):  # pylint: disable=redefined-outer-name
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  _fails_within(3, FileNotFoundError, lambda: (root / "absent.json").read_text())
  _fails_within(3, FileNotFoundError,
                lambda: epath.Path("gs://no-such-bucket/run/config.json").write_text("{}"))
  # A missing bucket reads as an absent path, not as an error: check the bucket itself.
  assert not epath.Path("gs://no-such-bucket/run").exists()
  assert not epath.Path("gs://no-such-bucket").exists()
  assert epath.Path(gcs_bucket).exists()

  tree = {"w": jnp.ones((4,))}
  def save_to_missing_bucket():
    options = ocp.CheckpointManagerOptions(create=False)
    with ocp.CheckpointManager("gs://no-such-bucket/ckpt", options=options) as manager:
      manager.save(1, args=ocp.args.StandardSave(tree))
      manager.wait_until_finished()
  # gcsfs (step metadata) or tensorstore (arrays) reports the 404 first; either names the bucket.
  _fails_within(10, (FileNotFoundError, ValueError), save_to_missing_bucket, match="no-such-bucket")

  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=tree["w"].sharding)}
  with ocp.CheckpointManager(root / "no_checkpoints") as manager:
    assert manager.latest_step() is None
    _fails_within(10, (ValueError, FileNotFoundError),
                  lambda: manager.restore(7, args=ocp.args.StandardRestore(target)))


def test_unreachable_endpoint_with_bounded_retries(gcs_emulator):  # pylint: disable=redefined-outer-name
  """tensorstore on a dead endpoint fails in seconds with `gcs_request_retries` bounded.

  (Its default, 32 retries up to 32 s apart, keeps a save retrying for many minutes.)
  """
  dead = _dead_endpoint()
  out = _child(f"""
      import json, os, time
      os.environ["TENSORSTORE_GCS_HTTP_URL"] = "http://{dead}"
      import tensorstore as ts
      retries = {{"max_retries": 2, "initial_delay": "0.1s", "max_delay": "0.2s"}}
      t = time.time()
      try:
        ts.KvStore.open({{"driver": "gcs", "bucket": "{gcs_emulator.bucket}",
                          "gcs_request_retries": retries}}).result().write("k", b"v").result()
      except Exception as e:
        print(json.dumps([type(e).__name__, str(e)[:200], time.time() - t]))
      """)
  name, message, seconds = out
  assert "retry attempts failed" in message and seconds < 5, out
