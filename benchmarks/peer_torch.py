"""The PyTorch peers of BENCH-U and BENCH-D: what a user would otherwise run, timed the same way.

    python benchmarks/peer_torch.py --bench U,D          # train steps, one JSON line per bench
    python benchmarks/peer_torch.py --bench U --sampling # + one velocity evaluation, Euler 50
    python benchmarks/peer_torch.py --bench U --profile --iters 3   # where torch's step goes
    python benchmarks/train_step.py --compare-torch      # ours vs these, interleaved, with ratios

BENCH-U: LFM's guided-diffusion `UNetModel` (torchcfm's copy of it, the architecture LFM trains:
width 64, mult (1, 2, 2), 2 res blocks, attention at 8x8 with 4 heads + middle, scale-shift norm;
6,950,340 parameters, the same count as lfm_jax's BENCH-U) on 4x16x16 latents, batch 32.
BENCH-D: DiT-S/2 (diffusers' `DiTTransformer2DModel`, 12 blocks, 6 heads of 64, patch 2,
adaLN-zero) on 4x32x32 latents, batch 16; diffusers' DiT always embeds a class label, so it has
one class (a 2-row table, 768 parameters more than ours).

The step is LFM's training step: t ~ U(0, 1), x_t = t x_1 + (1 - (1 - sigma_min) t) x_0 (x_0 noise,
x_1 data), loss = mean((v(t, x_t) - (x_1 - (1 - sigma_min) x_0))^2), backward, torch.optim.AdamW
(lr 1e-4, weight decay 0, PyTorch's defaults otherwise, as LFM constructs it), then an EMA of the
parameters (decay 0.9999). Threads: torch.set_num_threads(every core) unless --threads.

`--serve` makes this a worker for `train_step.py --compare-torch`: it builds the benches once,
then answers one JSON line per command read on stdin ({"op": "train" | "forward" | "euler",
"bench": ..., "iters": n[, "steps": k]} -> {"ms": [per-iteration wall ms], "cpu_ms": [...]}),
so both sides run in their own process (no thread pool of one spins while the other works) and
are timed in alternation.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (numpy, os, time; does not import jax)

SIGMA_MIN = 1e-4  # LFM's sigma_min, as lfm_jax.flow.SIGMA_MIN
EMA_DECAY = 0.9999


def torchcfm_unet_module():
  """torchcfm's guided-diffusion UNetModel without running torchcfm/__init__ (it needs POT)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  spec = importlib.machinery.PathFinder.find_spec("torchcfm")
  if spec is None:
    raise SystemExit("torchcfm is not installed (pip install torchcfm)")
  root = os.path.dirname(spec.origin)
  for name, path in (("torchcfm", root), ("torchcfm.models", os.path.join(root, "models"))):
    if name not in sys.modules:
      pkg = types.ModuleType(name)
      pkg.__path__ = [path]
      sys.modules[name] = pkg
  return importlib.import_module("torchcfm.models.unet.unet")


def build(bench: str, quick: bool = False):
  """(module, forward(t (B,), x NCHW) -> v, latent shape CHW, batch size)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if bench == "U":
    unet = torchcfm_unet_module()
    if quick:
      # 32 channels: guided diffusion's GroupNorm has 32 groups.
      model = unet.UNetModel(image_size=4, in_channels=4, model_channels=32, out_channels=4,
                             num_res_blocks=1, attention_resolutions=(), channel_mult=(1,),
                             num_heads=2, use_scale_shift_norm=True, dropout=0.0)
      shape, batch = (4, 4, 4), 8
    else:
      model = unet.UNetModel(image_size=16, in_channels=4, model_channels=64, out_channels=4,
                             num_res_blocks=2, attention_resolutions=(2,), channel_mult=(1, 2, 2),
                             num_heads=4, use_scale_shift_norm=True, dropout=0.0)
      shape, batch = (4, 16, 16), 32

    def forward(t, x):
      return model(t, x)
  elif bench == "D":
    from diffusers import DiTTransformer2DModel  # pylint: disable=g-import-not-at-top
    if quick:
      kw = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=4)
      shape, batch = (4, 4, 4), 8
    else:
      kw = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=32)
      shape, batch = (4, 32, 32), 16
    model = DiTTransformer2DModel(in_channels=4, out_channels=4, patch_size=2,
                                  norm_type="ada_norm_zero", num_embeds_ada_norm=1,
                                  dropout=0.0, **kw)
    labels = {}

    def forward(t, x):
      b = x.shape[0]
      if b not in labels:
        labels[b] = torch.zeros(b, dtype=torch.long)
      return model(x, timestep=t * 1000.0, class_labels=labels[b], return_dict=False)[0]
  else:
    raise ValueError(f"unknown bench {bench!r}")
  return model, forward, shape, batch


class Peer:
  """One bench's model, optimizer, EMA and fixed data batch; `train_step()` is LFM's step."""

  def __init__(self, bench: str, quick: bool = False):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.bench = bench
    self.model, self.forward, self.shape, self.batch = build(bench, quick)
    self.model.train()
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.num_params = sum(p.numel() for p in self.params)
    self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
    self.ema = [p.detach().clone() for p in self.params]
    g = torch.Generator().manual_seed(0)
    self.x1 = torch.randn((self.batch,) + tuple(self.shape), generator=g)
    self.losses = []

  def train_step(self) -> float:
    torch = self.torch
    x1 = self.x1
    t = torch.rand(x1.shape[0])
    x0 = torch.randn_like(x1)
    tb = t.view(-1, 1, 1, 1)
    xt = tb * x1 + (1 - (1 - SIGMA_MIN) * tb) * x0
    ut = x1 - (1 - SIGMA_MIN) * x0
    loss = torch.mean((self.forward(t, xt) - ut) ** 2)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      torch._foreach_mul_(self.ema, EMA_DECAY)  # pylint: disable=protected-access
      torch._foreach_add_(self.ema, self.params, alpha=1 - EMA_DECAY)  # pylint: disable=protected-access
    value = float(loss.detach())  # synchronous on CPU: the float is the step's end
    self.losses.append(value)
    return value

  def forward_eval(self, batch: int) -> None:
    torch = self.torch
    x = self.x1[:1].expand((batch,) + tuple(self.shape)).contiguous()
    with torch.inference_mode():
      self.forward(torch.full((batch,), 0.5), x)

  def euler(self, batch: int, steps: int) -> None:
    """`steps` Euler steps of dz/dt = v(t, z) from noise (LFM's time runs 0 -> 1 from noise):
    one network evaluation and one axpy per step, as lfm_jax's fixed-step Euler."""
    torch = self.torch
    self.model.eval()
    z = torch.randn((batch,) + tuple(self.shape), generator=torch.Generator().manual_seed(1))
    dt = 1.0 / steps
    with torch.inference_mode():
      for i in range(steps):
        z = z + dt * self.forward(torch.full((batch,), i * dt), z)
    self.model.train()


def time_op(peer: Peer, op: str, iters: int, batch: int = 32, steps: int = 50) -> dict:
  """Per-iteration wall and process-CPU milliseconds of one op."""
  fn = {"train": peer.train_step, "forward": lambda: peer.forward_eval(batch),
        "euler": lambda: peer.euler(batch, steps)}[op]
  ms, cpu = [], []
  for _ in range(iters):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    ms.append((time.perf_counter() - t0) * 1e3)
    cpu.append((time.process_time() - c0) * 1e3)
  return {"ms": ms, "cpu_ms": cpu}


def set_threads(threads: int) -> int:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch.get_num_threads()


def serve(benches, quick: bool, threads: int) -> None:
  """The --compare-torch worker: build, say ready, then answer commands until EOF."""
  import torch  # pylint: disable=g-import-not-at-top
  n = set_threads(threads)
  peers = {b: Peer(b, quick) for b in benches}
  print(json.dumps({"ready": True, "torch": torch.__version__, "threads": n,
                    "params": {b: p.num_params for b, p in peers.items()}}), flush=True)
  for line in sys.stdin:
    if not line.strip():
      continue
    cmd = json.loads(line)
    peer = peers[cmd["bench"]]
    out = time_op(peer, cmd["op"], int(cmd["iters"]), int(cmd.get("batch", 32)),
                  int(cmd.get("steps", 50)))
    if cmd["op"] == "train":
      out["loss_last"] = peer.losses[-1]
    print(json.dumps(out), flush=True)


# torch.profiler op names by kind: the convolutions (oneDNN) and the matmuls of the step.
_CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
             "aten::convolution", "aten::conv2d")
_MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul",
               "aten::linear", "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile(peer: "Peer", bench: str, iters: int, top: int) -> None:
  """torch.profiler over `iters` train steps: one JSON line per kind (self CPU time per step:
  convolutions, matmuls, the rest) and per op of the `top` slowest."""
  from torch import profiler  # pylint: disable=g-import-not-at-top
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(iters):
      peer.train_step()
  rows = [(e.key, e.self_cpu_time_total / 1e3 / iters, e.count // iters)
          for e in prof.key_averages() if e.self_cpu_time_total > 0]
  total = sum(ms for _, ms, _ in rows)
  kinds = {"convolution": 0.0, "matmul": 0.0, "other": 0.0}
  for name, ms, _ in rows:
    kinds["convolution" if name in _CONV_OPS else "matmul" if name in _MATMUL_OPS else "other"] += ms
  for kind, ms in kinds.items():
    C.emit({"kind": "peer_profile_category", "bench": bench, "category": kind,
            "self_cpu_ms_per_step": round(ms, 3), "share": round(ms / total, 4), "iters": iters})
  for name, ms, count in sorted(rows, key=lambda r: -r[1])[:top]:
    C.emit({"kind": "peer_profile_op", "bench": bench, "op": name,
            "self_cpu_ms_per_step": round(ms, 3), "calls_per_step": count})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--bench", default="U,D", help="comma list of U (U-Net), D (DiT-S/2)")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
  p.add_argument("--sampling", action="store_true",
                 help="also time one velocity evaluation and an Euler sample (--sample-batch)")
  p.add_argument("--sample-batch", type=int, default=32)
  p.add_argument("--euler-steps", type=int, default=50)
  p.add_argument("--quick", action="store_true", help="tiny models (seconds)")
  p.add_argument("--serve", action="store_true", help="worker mode for train_step.py --compare-torch")
  p.add_argument("--profile", action="store_true",
                 help="torch.profiler of --iters train steps: self CPU time by kind and op")
  p.add_argument("--top", type=int, default=12, help="--profile: slowest ops printed")
  args = p.parse_args(argv)
  benches = [b.strip() for b in args.bench.split(",") if b.strip()]
  if args.serve:
    serve(benches, args.quick, args.threads)
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  threads = set_threads(args.threads)
  for bench in benches:
    peer = Peer(bench, args.quick)
    time_op(peer, "train", args.warmup)
    if args.profile:
      profile(peer, bench, args.iters, args.top)
      continue
    t = time_op(peer, "train", args.iters)
    rec = {"kind": "peer_train_step", "bench": bench, "framework": "torch",
           "torch": torch.__version__, "threads": threads, "params": peer.num_params,
           "latent_shape_nchw": list(peer.shape), "batch_size": peer.batch,
           "ms_per_step": round(float(np.median(t["ms"])), 3),
           "ms_per_step_min": round(float(np.min(t["ms"])), 3),
           "cpu_ms_per_step": round(float(np.median(t["cpu_ms"])), 3),
           "loss_last": peer.losses[-1], "iters": args.iters, "loadavg": C.loadavg()}
    C.emit(rec)
    if args.sampling:
      for op, iters in (("forward", args.iters), ("euler", max(2, args.iters // 10))):
        time_op(peer, op, 1, args.sample_batch, args.euler_steps)
        t = time_op(peer, op, iters, args.sample_batch, args.euler_steps)
        C.emit({"kind": f"peer_{op}", "bench": bench, "framework": "torch", "threads": threads,
                "batch_size": args.sample_batch,
                "euler_steps": args.euler_steps if op == "euler" else None,
                "ms": round(float(np.median(t["ms"])), 3), "iters": iters,
                "loadavg": C.loadavg()})


if __name__ == "__main__":
  main()
