"""The command-line modes, in pipeline order (lfm_jax/stages.py implements one function each).

  pipeline     autoencoder -> encode -> train -> sample -> evaluate -> export
  autoencoder  train the first-stage autoencoder here, or load config.autoencoder.pretrained
  encode       encode the training split once into the latent cache
  train        train the velocity network by flow matching (resumes automatically)
  sample       sample config.sample.num_samples images: PNG grid and .npz
  evaluate     sample config.eval.num_samples images and compute config.eval.metrics
  score        score every training example (config.score.criterion)
  stability    same-seed comparison with config.stability.other_workdir's model
  export       write a self-describing model directory (lfm_jax.load reads it)
"""

MODES = ("pipeline", "autoencoder", "encode", "train", "sample", "evaluate", "score",
         "stability", "export")
