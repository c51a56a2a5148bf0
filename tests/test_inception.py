"""FID InceptionV3: Flax port vs torch-fidelity's pure-torch feature extractor (random weights)."""


import numpy as np
import pytest

import jax
import jax.numpy as jnp

from helpers import randomise_batch_norm, random_fidelity_inception
from lfm_jax.converters.common import WeightConversionError
from lfm_jax.converters.inception import convert_inception_state_dict, load_inception
from lfm_jax.models.inception import InceptionV3, resize_bilinear_tf1




@pytest.fixture(scope="module")
def torch_reference():
  """torch-fidelity's InceptionV3 with seeded random weights and calibrated, randomised BN stats."""
  torch = pytest.importorskip("torch")
  model, fe = random_fidelity_inception(("2048",), seed=0, calibration_size=96)
  randomise_batch_norm(model, torch.Generator().manual_seed(1))
  return model, fe


def test_resize_matches_torch_fidelity(torch_reference):
  torch = pytest.importorskip("torch")
  _, fe = torch_reference
  rng = np.random.default_rng(0)
  for h, w in [(64, 64), (37, 128), (299, 299)]:
    x = rng.integers(0, 256, size=(2, h, w, 3)).astype(np.float32)
    ref = fe.interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False)
    ours = np.asarray(resize_bilinear_tf1(jnp.asarray(x), (299, 299)))
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
    if (h, w) == (299, 299):
      np.testing.assert_array_equal(ours, x)


def test_inception_parity_with_torch_fidelity(torch_reference):
  torch = pytest.importorskip("torch")
  model, _ = torch_reference
  state_dict = model.state_dict()
  variables = convert_inception_state_dict(state_dict)
  # Every key mapped: the only keys not consumed are the explicitly-unused ones.
  n_used = sum(x.size > 0 for x in jax.tree_util.tree_leaves(variables))
  unused = sorted(k for k in state_dict if not (k.startswith("fc.") or
                                                k.endswith("num_batches_tracked")))
  assert n_used == len(unused) == 470

  rng = np.random.default_rng(0)
  groups = [rng.integers(0, 256, size=(2, s, s, 3), dtype=np.uint8) for s in (64, 128)]
  with torch.no_grad():
    ref = np.concatenate([
        model(torch.from_numpy(g).permute(0, 3, 1, 2).contiguous())[0].numpy() for g in groups])
  module = InceptionV3()
  # One compile at 299: resize each size eagerly, then the network (resize at 299 is exact identity).
  x = jnp.concatenate([resize_bilinear_tf1(jnp.asarray(g, jnp.float32)) for g in groups])
  ours = np.asarray(jax.jit(module.apply)(variables, x))
  assert ours.shape == (4, 2048)
  assert np.abs(ref).mean() > 1e-2  # features are not degenerate
  err = np.abs(ours - ref).max()
  print(f"inception parity: max abs err {err:.3g}, mean |feature| {np.abs(ref).mean():.3g}")
  assert err < 1e-3


def test_converter_is_strict(tmp_path, torch_reference):
  torch = pytest.importorskip("torch")
  model, _ = torch_reference
  sd = dict(model.state_dict())
  bad = dict(sd)
  del bad["Mixed_6b.branch7x7_2.conv.weight"]
  bad["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
  bad["Mixed_5b.branch1x1.bn.running_var"] = torch.zeros(3)
  bad["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head: not the FID network
  with pytest.raises(WeightConversionError) as e:
    convert_inception_state_dict(bad)
  msg = str(e.value)
  for k in ["Mixed_6b.branch7x7_2.conv.weight", "AuxLogits.fc.weight",
            "Mixed_5b.branch1x1.bn.running_var", "fc.weight"]:
    assert k in msg
  # Round trip through a .pth file (no fc / counters is fine: they are optional).
  trimmed = {k: v for k, v in sd.items() if not k.startswith("fc.")}
  path = tmp_path / "inception.pth"
  torch.save(trimmed, path)
  module, variables = load_inception(str(path))
  assert isinstance(module, InceptionV3)
  np.testing.assert_array_equal(variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
                                sd["Conv2d_1a_3x3.conv.weight"].permute(2, 3, 1, 0).numpy())
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    load_inception(str(tmp_path / "absent.pth"))


def test_inception_feature_extractor_protocol(tmp_path, torch_reference):
  """[-1, 1] grey images through get_feature_extractor("inception") == torch-fidelity on the
  uint8 RGB images they would be saved as."""
  torch = pytest.importorskip("torch")
  from lfm_jax.metrics.features import get_feature_extractor

  model, _ = torch_reference
  path = tmp_path / "pt_inception.pth"
  torch.save(model.state_dict(), path)
  extractor = get_feature_extractor("inception", weights_path=str(path))
  assert extractor.name == "inception" and extractor.dim == 2048
  u8 = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 1), dtype=np.uint8)
  images = u8.astype(np.float32) / 127.5 - 1.0
  ours = np.asarray(extractor(images))
  rgb = torch.from_numpy(np.repeat(u8, 3, axis=-1)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    ref = model(rgb)[0].numpy()
  err = np.abs(ours - ref).max()
  print(f"inception extractor protocol: max abs err {err:.3g}")
  assert err < 1e-3
