"""The stages, one module each, each with `run(config, workdir)` (`main.py` runs those named in
`config.stages`, in this order):

  data         stages/data.py         the dataset (synthetic, or checks ingested records)
  vae          stages/vae.py          the image VAE + PatchGAN
  autoencoder  stages/autoencoder.py  the multi-modal autoencoder, VAE frozen
  latents      stages/latents.py      every training clip encoded by the frozen autoencoder
  generator    stages/generator.py    the joint audio-video DiT on those latents
  sample       stages/sample.py       sounding videos from the trained models
  evaluate     stages/evaluate.py     FVD / KVD / FAD and the sync scores

The training stages' Tasks and quality signals are in `train/tasks.py`; every workdir path is in
`workdir.py`; the generation chain the sample stage and the generator's quality signals share is
in `sampling.py`. Stages never import each other: a stage whose input another stage makes raises
`workdir.MissingInput` naming that stage before doing any work, and `main.py` runs it first.
"""
