"""Test-only PyTorch reference of EDM's `DhariwalUNet` (as LFM's models/EDM.py builds it for
model_type "adm"), written from the architecture's description for the converter parity tests.

Its state-dict keys are EDM's: map_layer0/1.*, map_label.weight, enc.<R>x<R>_conv.*,
enc.<R>x<R>_block<i>.{norm0,conv0,affine,norm1,conv1,skip,norm2,qkv,proj}.*, enc.<R>x<R>_down.*,
dec.<R>x<R>_{in0,in1,up,block<i>}.*, out_norm.*, out_conv.*, plus the fixed `resample_filter`
buffers of the up/down convolutions. Forward: `model(t, x, y=None)`, x NCHW, t the raw LFM time,
y integer labels (None: no label term). Only the non-fused [1, 1] resampling is modelled.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.Module):
  """EDM's GroupNorm: min(num_groups, C // min_channels_per_group) groups."""

  def __init__(self, channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
    super().__init__()
    self.groups = min(num_groups, channels // min_channels_per_group)
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(channels))
    self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):
    return F.group_norm(x, self.groups, self.weight, self.bias, self.eps)


class Conv2d(nn.Module):
  """kernel 0: no parameters (pure resampling). up: 2x nearest before the conv; down: 2x2 mean
  before the conv; both through the [1, 1] filter kept as the `resample_filter` buffer."""

  def __init__(self, cin, cout, kernel, up=False, down=False):
    super().__init__()
    self.up, self.down = up, down
    self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel)) if kernel else None
    self.bias = nn.Parameter(torch.empty(cout)) if kernel else None
    f = torch.tensor([1.0, 1.0])
    f = torch.outer(f, f)[None, None] / f.sum() ** 2  # (1, 1, 2, 2), all 0.25
    self.register_buffer("resample_filter", f if (up or down) else None)

  def forward(self, x):
    c = x.shape[1]
    if self.up:  # transposed conv with 4 * filter == nearest-neighbour 2x
      x = F.conv_transpose2d(x, (4 * self.resample_filter).tile(c, 1, 1, 1), groups=c, stride=2)
    if self.down:
      x = F.conv2d(x, self.resample_filter.tile(c, 1, 1, 1), groups=c, stride=2)
    if self.weight is not None:
      x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
    return x


class UNetBlock(nn.Module):
  """ResBlock (scale-shift norm, up/down inside) + optional multi-head self-attention."""

  def __init__(self, cin, cout, emb_channels, up=False, down=False, attention=False,
               channels_per_head=64):
    super().__init__()
    self.in_channels = cin
    self.heads = cout // channels_per_head if attention else 0
    self.norm0 = GroupNorm(cin)
    self.conv0 = Conv2d(cin, cout, 3, up=up, down=down)
    self.affine = nn.Linear(emb_channels, 2 * cout)
    self.norm1 = GroupNorm(cout)
    self.conv1 = Conv2d(cout, cout, 3)
    self.skip = None
    if cout != cin or up or down:
      self.skip = Conv2d(cin, cout, 1 if cout != cin else 0, up=up, down=down)
    if self.heads:
      self.norm2 = GroupNorm(cout)
      self.qkv = Conv2d(cout, 3 * cout, 1)
      self.proj = Conv2d(cout, cout, 1)

  def forward(self, x, emb):
    orig = x
    x = self.conv0(F.silu(self.norm0(x)))
    scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
    x = F.silu(shift + self.norm1(x) * (scale + 1))
    x = self.conv1(x)
    x = x + (self.skip(orig) if self.skip is not None else orig)
    if self.heads:
      b, c, h, w = x.shape
      # channel layout of the 3C qkv output: [head][channel in head][q, k, v]
      q, k, v = self.qkv(self.norm2(x)).reshape(b * self.heads, c // self.heads, 3, h * w).unbind(2)
      logits = torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(c // self.heads)
      a = torch.einsum("nqk,nck->ncq", logits.softmax(dim=2), v)
      x = self.proj(a.reshape(b, c, h, w)) + x
    return x


class DhariwalUNet(nn.Module):

  def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, model_channels=192,
               channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8)):
    super().__init__()
    self.label_dim = label_dim
    mc, emb = model_channels, 4 * model_channels
    self.model_channels = mc
    self.map_layer0 = nn.Linear(mc, emb)
    self.map_layer1 = nn.Linear(emb, emb)
    self.map_label = nn.Linear(label_dim, emb, bias=False) if label_dim else None

    self.enc = nn.ModuleDict()
    widths = []
    cout = in_channels
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        cout = mc * mult
        self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, 3)
      else:
        self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, emb, down=True)
      widths.append(cout)
      for i in range(num_blocks):
        cin, cout = cout, mc * mult
        self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, emb,
                                                      attention=res in attn_resolutions)
        widths.append(cout)

    self.dec = nn.ModuleDict()
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, emb, attention=True)
        self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, emb)
      else:
        self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, emb, up=True)
      for i in range(num_blocks + 1):
        cin, cout = cout + widths.pop(), mc * mult
        self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, emb,
                                                      attention=res in attn_resolutions)
    self.out_norm = GroupNorm(cout)
    self.out_conv = Conv2d(cout, out_channels, 3)

  def randomize(self, seed=0):
    """Non-zero random weights everywhere (EDM zero-initialises conv1, proj and out_conv)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for name, p in self.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name.rsplit(".", 2)[-2]:
          p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        elif name.endswith("bias"):
          p.copy_(0.1 * noise)
        else:
          fan_in = p[0].numel()
          p.copy_(noise * min(0.2, 1.5 / math.sqrt(fan_in)))
    return self.eval()

  def forward(self, t, x, y=None):
    half = self.model_channels // 2
    freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32) / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=1)
    emb = self.map_layer1(F.silu(self.map_layer0(emb)))
    if self.map_label is not None and y is not None:
      emb = emb + self.map_label(F.one_hot(y, self.label_dim).float())
    emb = F.silu(emb)
    skips = []
    for block in self.enc.values():
      x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
      skips.append(x)
    for block in self.dec.values():
      if x.shape[1] != block.in_channels:
        x = torch.cat([x, skips.pop()], dim=1)
      x = block(x, emb)
    return self.out_conv(F.silu(self.out_norm(x)))
