"""Pieces every stage shares. Modules:

- ``common.config``: the one config loader: YAML plus dotted overrides -> a frozen, type-checked dataclass.
- ``common.checkpoint``: components on disk (``config.json`` + ``model.safetensors``) and pipeline directories.
- ``common.component_check``: a component's config checked against its weights' header before it is built.
- ``common.integrity``: the hash of a component's weights, recorded in ``config.json`` and checked on load.
- ``common.layers``: the shared layers: attention, ResBlock, resampling, timestep embeddings.
- ``common.text_encoder``: the frozen Hugging Face text encoder: prompts -> token states and a padding mask.
- ``common.captions``: caption templates: several phrasings of each training caption, one drawn per step.
- ``common.data``: the built-in datasets (shapes, emoji, an image folder) behind one interface.
- ``common.array_store``: arrays on disk read through memory maps, and unpadded fp16 text states, for the caches.
- ``common.cache_build``: an encoded dataset's cache built by every process at once, each its share, resumably.
- ``common.images``: PIL images <-> (3, H, W) tensors in [-1, 1], and image grids.
- ``common.metrics``: image-quality metrics (PSNR, SSIM) on (B, 3, H, W) tensors in [-1, 1].
- ``common.evaluation``: prompt faithfulness and diversity of a generator on the shapes data.
- ``common.distribution``: distribution scores without a pretrained network (Laplacian-pyramid SWD), and their records.
- ``common.inception_scores``: FID and KID from an Inception-v3 weights file given by path (never downloaded).
- ``common.training``: what every training script shares: run config, accelerator, data stream, loop.
- ``common.run_state``: a run's training checkpoints on disk: atomic saves, rotation, the newest complete one.
- ``common.run_control``: the run-directory lock and preemption (SIGTERM/SIGINT: save, then exit).
- ``common.resume``: resuming a run: guard the config against changes, restore the newest checkpoint.
- ``common.safe_pickle``: checkpoint pickles read as weights and plain data only (pickled code never runs).
- ``common.precision``: which floating-point precision to train and sample in (``precision: auto``).
- ``common.compile``: whether a run compiles its network (``run.compile: auto``), and compiling in place.
- ``common.progress``: the training progress bar, towards whichever limit ends the run.
- ``common.ema``: exponential moving average of model weights.
- ``common.init_from``: ``init_from=PATH``: a training run starts from a trained or imported component.
- ``common.lora``: LoRA adapters through peft: the ``lora`` config section, the adapter file, attach/detach.
- ``common.environment``: versions, build and machine of a result, and guards for newer torch APIs.
"""
