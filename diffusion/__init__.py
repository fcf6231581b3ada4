"""Latent diffusion: noise schedules, training objectives, samplers, guidance and the U-Net. Modules:

- ``diffusion.schedules``: variance-preserving noise schedules (ScheduleConfig), the closed-form forward
  process and sampling timesteps.
- ``diffusion.objectives``: DiffusionConfig, training targets and loss weighting, condition dropout, the
  one denoiser contract.
- ``diffusion.samplers``: the samplers (DDIM, DPM-Solver++, ...), pure functions of a denoiser.
- ``diffusion.guidance``: classifier-free and classifier guidance and inpainting as denoiser wrappers.
- ``diffusion.unet``: the denoising U-Net (text- and/or class-conditional), with save/load.
- ``diffusion.blocks``: the U-Net's attention blocks and timestep embedder.
- ``diffusion.classifier``: the noisy-latent classifier of classifier guidance.
- ``diffusion.latent_cache``: a dataset encoded once by the frozen autoencoder (and text encoder).
- ``diffusion.latent_diffusion``: the bundle (autoencoder + U-Net + text encoder or none + schedule) that
  saves and loads a pipeline directory; :mod:`pipelines` runs it.
- ``diffusion.convert``: diffusers ``UNet2DConditionModel`` weights -> :class:`diffusion.unet.UNet`.
- ``diffusion.stable_diffusion``: a diffusers Stable Diffusion folder read in place as the bundle.
- ``diffusion.export``: the U-Net and the noise process as diffusers ``UNet2DConditionModel`` / ``DDIMScheduler``.
- ``diffusion.train_latent`` (its config: ``diffusion.train_config``) and ``diffusion.train_classifier``:
  the training scripts; ``diffusion.evaluate_shapes``: scores a shapes model.

The text encoder is :mod:`common.text_encoder`. Modules are imported explicitly
(``from diffusion.samplers import sample_dpmpp_2m``); this package file imports nothing so that each piece
stays cheap to load on its own.
"""
