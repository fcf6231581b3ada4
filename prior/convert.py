"""Import taming-transformers ``Net2NetTransformer`` checkpoints: its minGPT becomes our AR prior, its VQ-GAN
our autoencoder, together a token prior pipeline directory.

    python -m prior.convert taming last.ckpt runs/imported_cin --config configs/2021-04-03T19-39-50-project.yaml \\
        --class-names imagenet_classes.txt
    python -m pipelines.generate runs/imported_cin goldfish --top-k 600 -n 4 --seed 0 -o goldfish.png

How the two models line up:

- taming's GPT reads the condition and the image from one token table: its sequence is
  ``[c, z_0 .. z_{N-2}]``, where c is the class id itself (``Labelator``, class-conditional models) or a
  fixed ``sos_token`` (``SOSProvider``, unconditional models). Ours keeps conditions in their own table, so
  rows ``[:K]`` of ``tok_emb`` become the code embeddings and the condition rows are copied: our class c
  (id c + 1) gets taming's row c; an unconditional model becomes ``condition="none"`` whose start
  embedding (id 0) is row ``sos_token``.
- Our id 0 of a class prior, the null class of classifier-free guidance, has no taming counterpart: taming
  never trains one. It is left at zeros and the prior is saved with ``null_condition=False``, so
  :class:`pipelines.TokensToImage` refuses ``guidance_scale`` != 1 and ``""`` prompts for it; the saved
  default guidance is 1 (taming samples without guidance too).
- minGPT's blocks are ours (pre-norm, separate q/k/v projections with biases, an MLP, a head without bias)
  but for its exact (erf) GELU, kept with ``gelu="exact"``: ``key/query/value/proj`` become
  ``to_k/to_q/to_v/to_out``, ``ln1/ln2/ln_f`` ``norm1/norm2/norm``. Our prior feeds P + N - 1 = N positions,
  the first N rows of ``pos_emb``; the ``attn.mask`` buffers must be plain causal masks (``n_unmasked=0``).
- Codes keep taming's ids (the imported VQ-GAN uses the plain quantizer) and raster order; a permuter other
  than the identity is refused. A vocabulary larger than the codebook (room for more class ids than codes)
  keeps the K code logits only: taming would sample the others just to fail decoding them.

What the tensors do not record (the number of heads, the condition kind, the number of classes, the sos
token, the resolution) comes from the run's ``configs/*-project.yaml`` (``--config``, read as plain data:
no class named in it is imported) or from flags, which win. Every tensor of the checkpoint maps onto ours;
anything left over is an error that names it, except the first stage's training-only ``loss.*`` tensors
(skipped and reported, as :mod:`autoencoder.convert` does). Models conditioned on a second VQ-GAN (depth,
segmentation), on coordinates or on images are not supported and fail by name.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import yaml
from torch import Tensor

from autoencoder import convert as autoencoder_convert
from autoencoder.model import VQGAN
from common.checkpoint import CheckpointError, load_legacy_checkpoint, load_state_strict
from common.config import ConfigError
from prior.sampling import SamplingConfig
from prior.token_prior import TokenPrior
from prior.transformer import GPT, PriorConfig

logger = logging.getLogger(__name__)

GPT_PREFIX, FIRST_STAGE_PREFIX, COND_STAGE_PREFIX, PERMUTER_PREFIX = (
    "transformer.", "first_stage_model.", "cond_stage_model.", "permuter.")
UNCONDITIONAL = "__is_unconditional__"  # taming's cond_stage_config for an SOSProvider model
# minGPT's names inside blocks.<i> -> ours (each with .weight and .bias)
BLOCK_NAMES = {"ln1": "norm1", "ln2": "norm2", "attn.query": "attn.to_q", "attn.key": "attn.to_k",
               "attn.value": "attn.to_v", "attn.proj": "attn.to_out", "mlp.0": "mlp.0", "mlp.2": "mlp.2"}
TOP_LEVEL = {"tok_emb.weight": "token_embedding.weight", "ln_f.weight": "norm.weight", "ln_f.bias": "norm.bias"}


@dataclass(frozen=True)
class TamingPrior:
    """What a ``Net2NetTransformer`` checkpoint's tensors do not record (its project yaml does).

    Attributes:
        heads: the GPT's ``n_head``.
        condition: "class" (``Labelator``: the class id is the first token) or "sos" (``SOSProvider``: a
            fixed start token, an unconditional model).
        num_classes: for "class", the number of classes (token ids 0 .. num_classes - 1).
        sos_token: for "sos", the start token's id.
        resolution: the image size the models were trained at; decides the token grid (resolution over the
            VQ-GAN's downsampling factor) and the VQ-GAN's attention levels.
    """

    heads: int
    condition: Literal["class", "sos"]
    num_classes: int = 0
    sos_token: int = 0
    resolution: int = 256

    def __post_init__(self) -> None:
        numbers = ("heads", "num_classes", "sos_token", "resolution")
        wrong = [f"{name}={getattr(self, name)!r} must be an integer" for name in numbers
                 if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int)]
        if wrong:
            raise CheckpointError("cannot import the taming transformer: " + "; ".join(wrong))
        problems = [f"{name}={getattr(self, name)} must be >= 1" for name in ("heads", "resolution")
                    if getattr(self, name) < 1]
        if self.condition not in ("class", "sos"):
            problems.append(f"condition must be 'class' or 'sos', got {self.condition!r}")
        if self.condition == "class" and self.num_classes < 1:
            problems.append("a class-conditional model needs num_classes >= 1 (--num-classes, or --class-names)")
        if self.sos_token < 0:
            problems.append(f"sos_token={self.sos_token} must be >= 0")
        if problems:
            raise CheckpointError("cannot import the taming transformer: " + "; ".join(problems))


# ---------------------------------------------------------------- what the tensors do not say


def facts_from_project(path: str | Path) -> dict[str, Any]:
    """The :class:`TamingPrior` fields a taming ``*-project.yaml`` records (read as data only)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"cannot read the taming config {path}: {error}") from error
    target = str(_get(data, "model", "target") or "")
    if not target.endswith("Net2NetTransformer"):
        raise CheckpointError(f"{path} does not configure a Net2NetTransformer (model.target is {target!r}); "
                              "give the project yaml of the transformer run, not of its VQ-GAN")
    params = _get(data, "model", "params") or {}
    permuter = str(_get(params, "permuter_config", "target") or "permuter.Identity")
    if not permuter.endswith("permuter.Identity"):
        raise CheckpointError(f"{path}: permuter {permuter} orders the tokens other than in raster order; only "
                              "the identity permuter can be imported")
    facts = {"heads": _get(params, "transformer_config", "params", "n_head"),
             "resolution": _get(params, "first_stage_config", "params", "ddconfig", "resolution")}
    return {k: v for k, v in {**facts, **_condition_facts(params, path)}.items() if v is not None}


def _get(node: Any, *keys: str) -> Any:
    """``node[k1][k2]...``, or None where a level is missing or not a mapping."""
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _condition_facts(params: dict[str, Any], path: Path) -> dict[str, Any]:
    cond = _get(params, "cond_stage_config")
    cond_target = str(_get(cond, "target") or cond)
    if _get(params, "unconditional") or cond == UNCONDITIONAL or cond_target.endswith(".SOSProvider"):
        sos = _get(params, "sos_token")
        return {"condition": "sos", "sos_token": sos if sos is not None else _get(cond, "params", "sos_token") or 0}
    if cond_target.endswith(".Labelator"):
        return {"condition": "class", "num_classes": _get(cond, "params", "n_classes")}
    raise CheckpointError(f"{path}: the condition stage {cond_target!r} is not supported; only class-conditional "
                          "(taming.modules.util.Labelator) and unconditional (SOSProvider) transformers import")


def read_class_names(path: str | Path) -> list[str | None]:
    """One class name per line (an empty line: a class without a name); names must be distinct."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise CheckpointError(f"cannot read the class names file {path}: {error}") from error
    names = [line.strip() or None for line in lines]
    repeated = sorted({n for n in names if n is not None and names.count(n) > 1})
    if repeated:
        raise CheckpointError(f"{path}: class names must be distinct, {repeated} repeat; fix the file")
    return names


def resolve_spec(facts: dict[str, Any], class_names: list[str | None] | None = None) -> TamingPrior:
    """A :class:`TamingPrior` from the project yaml's facts and the flags' (later keys win).

    ``class_names`` imply a class-conditional model with one class per name unless told otherwise.
    """
    facts = dict(facts)
    if class_names is not None:
        facts.setdefault("condition", "class")
        facts.setdefault("num_classes", len(class_names))
    missing = [name for name in ("heads", "condition") if name not in facts]
    if missing:
        hints = {"heads": "--heads N (n_head of transformer_config)",
                 "condition": "--num-classes N or --class-names FILE (class-conditional, Labelator) or --sos-token T "
                              "(unconditional, SOSProvider)"}
        raise CheckpointError("the checkpoint's tensors do not record " + " and ".join(missing) + ": pass --config "
                              "with the run's configs/*-project.yaml, or " + "; ".join(hints[m] for m in missing))
    spec = TamingPrior(**facts)
    if class_names is not None and (spec.condition != "class" or len(class_names) != spec.num_classes):
        raise CheckpointError(f"{len(class_names)} class names for a model with "
                              f"{spec.num_classes if spec.condition == 'class' else 'no'} classes; give one line "
                              "per class")
    return spec


# ---------------------------------------------------------------- tensors


def split_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The GPT's and the first stage's tensors (prefixes removed); anything else is an error naming it."""
    if f"{GPT_PREFIX}tok_emb.weight" not in state_dict:
        raise CheckpointError("no transformer.tok_emb.weight: this is not a taming Net2NetTransformer checkpoint "
                              "(a VQ-GAN alone converts with python -m autoencoder.convert taming)")
    cond = sorted(k for k in state_dict if k.startswith(COND_STAGE_PREFIX))
    if cond:
        raise CheckpointError(f"the model is conditioned by a trained stage ({cond[0]}, ...: depth, segmentation or "
                              "image conditioning); only class-conditional and unconditional transformers import")
    _check_permuter({k: v for k, v in state_dict.items() if k.startswith(PERMUTER_PREFIX)})
    groups: dict[str, dict[str, Tensor]] = {GPT_PREFIX: {}, FIRST_STAGE_PREFIX: {}, PERMUTER_PREFIX: {}}
    unknown = []
    for key, tensor in state_dict.items():
        prefix = next((p for p in groups if key.startswith(p)), None)
        if prefix is None:
            unknown.append(key)
        else:
            groups[prefix][key[len(prefix):]] = tensor
    if unknown:
        raise CheckpointError(f"unexpected tensors in the Net2NetTransformer checkpoint: {sorted(unknown)}")
    if "encoder.conv_in.weight" not in groups[FIRST_STAGE_PREFIX]:
        raise CheckpointError("the checkpoint holds no first_stage_model.* VQ-GAN, which decodes the prior's codes")
    return groups[GPT_PREFIX], groups[FIRST_STAGE_PREFIX]


def _check_permuter(tensors: dict[str, Tensor]) -> None:
    order = tensors.get(f"{PERMUTER_PREFIX}forward_shuffle_idx")
    extra = sorted(set(tensors) - {f"{PERMUTER_PREFIX}forward_shuffle_idx", f"{PERMUTER_PREFIX}backward_shuffle_idx"})
    if extra or (order is not None and not torch.equal(order.long().cpu(), torch.arange(order.numel()))):
        raise CheckpointError(f"the checkpoint's permuter ({sorted(tensors)}) orders the tokens other than in raster "
                              "order; only the identity permuter can be imported")


def prior_config(gpt: dict[str, Tensor], spec: TamingPrior, codebook_size: int, grid_size: int) -> PriorConfig:
    """Our prior's config from the GPT's tensor shapes, the spec and the VQ-GAN's codebook and grid."""
    vocab, width = gpt["tok_emb.weight"].shape
    block_size = gpt["pos_emb"].shape[1] if "pos_emb" in gpt else 0
    depth = len({m.group(1) for key in gpt if (m := re.match(r"blocks\.(\d+)\.", key))})
    hidden = gpt["blocks.0.mlp.0.weight"].shape[0] if "blocks.0.mlp.0.weight" in gpt else 0
    problems = []
    if vocab < codebook_size:
        problems.append(f"its vocabulary ({vocab}) is smaller than the VQ-GAN's codebook ({codebook_size})")
    if block_size < grid_size ** 2:
        problems.append(f"it sees {block_size} positions, a {grid_size}x{grid_size} grid needs {grid_size ** 2}: "
                        f"is --resolution {spec.resolution} the one the model was trained at?")
    if spec.condition == "class" and spec.num_classes > vocab:
        problems.append(f"num_classes={spec.num_classes} exceeds its vocabulary ({vocab}): class ids are tokens")
    if spec.condition == "sos" and spec.sos_token >= vocab:
        problems.append(f"sos_token={spec.sos_token} is not a token of its vocabulary ({vocab})")
    if width % spec.heads:
        problems.append(f"its width {width} is not divisible by heads={spec.heads}")
    if not depth or not hidden:
        problems.append("it has no transformer.blocks.0.mlp.0.weight")
    if problems:
        raise CheckpointError("cannot import the taming transformer: " + "; ".join(problems))
    if vocab > codebook_size:
        logger.warning("the GPT's vocabulary has %d tokens, the codebook %d codes: the logits of the %d tokens "
                       "that are no code are dropped", vocab, codebook_size, vocab - codebook_size)
    return PriorConfig(codebook_size=codebook_size, grid_size=grid_size,
                       condition="class" if spec.condition == "class" else "none", num_classes=spec.num_classes
                       if spec.condition == "class" else 0, width=width, depth=depth, heads=spec.heads,
                       mlp_ratio=hidden / width, gelu="exact", null_condition=spec.condition != "class")


def prior_weights(gpt: dict[str, Tensor], config: PriorConfig, spec: TamingPrior) -> dict[str, Tensor]:
    """minGPT's tensors renamed and cut to our layout; a tensor left over is an error that names it."""
    left = dict(gpt)

    def take(key: str) -> Tensor:
        if key not in left:
            raise CheckpointError(f"the checkpoint lacks transformer.{key}")
        return left.pop(key)

    ours = {mine: take(theirs) for theirs, mine in TOP_LEVEL.items()}
    table, codes = ours["token_embedding.weight"], config.codebook_size
    ours["token_embedding.weight"] = table[:codes]
    ours["head.weight"] = take("head.weight")[:codes]
    ours["position_embedding"] = take("pos_emb")[:, :config.max_len]
    if spec.condition == "class":  # id 0, the null class, has no taming row (see the module docstring)
        ours["class_embedding.weight"] = torch.cat([table.new_zeros(1, config.width), table[:spec.num_classes]])
    else:
        ours["class_embedding.weight"] = table[spec.sos_token:spec.sos_token + 1]
    for index in range(config.depth):
        _check_causal(left.pop(f"blocks.{index}.attn.mask", None), index)
        for theirs, mine in BLOCK_NAMES.items():
            for kind in ("weight", "bias"):
                ours[f"blocks.{index}.{mine}.{kind}"] = take(f"blocks.{index}.{theirs}.{kind}")
    if left:
        raise CheckpointError(f"unexpected transformer tensors: {sorted('transformer.' + k for k in left)}")
    return {key: tensor.float().contiguous().clone() for key, tensor in ours.items()}


def _check_causal(mask: Tensor | None, index: int) -> None:
    """minGPT's ``n_unmasked`` lets the first tokens see each other; our prior is strictly causal."""
    if mask is None:
        return
    square = mask.reshape(mask.shape[-2:]).bool()
    if not torch.equal(square, torch.ones(square.shape, dtype=torch.bool).tril()):
        raise CheckpointError(f"transformer.blocks.{index}.attn.mask is not a causal mask (a model trained with "
                              "n_unmasked > 0); only plain causal transformers import")


# ---------------------------------------------------------------- public entry points


def from_taming_state_dict(state_dict: dict[str, Tensor], spec: TamingPrior,
                           class_names: list[str | None] | None = None) -> TokenPrior:
    """Our token prior bundle (VQ autoencoder + GPT) from a ``Net2NetTransformer`` state dict.

    Args:
        state_dict: the Lightning module's ``state_dict``: ``transformer.*`` (minGPT), ``first_stage_model.*``
            (the VQ-GAN; its ``loss.*`` is skipped) and perhaps an identity permuter's ``permuter.*``.
        spec: what the tensors do not record (see :class:`TamingPrior`).
        class_names: for a class-conditional model, the name of each class (prompts map to classes by name).

    Returns:
        A :class:`TokenPrior` in eval mode whose default sampling uses no guidance.
    """
    gpt, first_stage = split_state_dict(state_dict)
    autoencoder = autoencoder_convert.from_taming_state_dict(first_stage, resolution=spec.resolution)
    if not isinstance(autoencoder, VQGAN):
        raise CheckpointError("the first stage is not a VQ-GAN (no quantize.embedding.weight); a token prior needs one")
    grid = spec.resolution // autoencoder.downsample_factor
    config = prior_config(gpt, spec, autoencoder.config.codebook_size, grid)
    prior = GPT(config)
    load_state_strict(prior, prior_weights(gpt, config, spec), "taming transformer")
    return TokenPrior(autoencoder, prior.eval(), class_names=class_names, sampling=SamplingConfig(guidance=1.0))


def load_taming_checkpoint(path: str | Path, spec: TamingPrior | None = None, *, config: str | Path | None = None,
                           class_names: list[str | None] | None = None, **overrides: Any) -> TokenPrior:
    """Read a ``Net2NetTransformer`` ``.ckpt`` (weights only, never pickled code) and convert it.

    Args:
        path: the checkpoint.
        spec: the facts the tensors lack; when None they come from ``config`` (the run's project yaml)
            and ``overrides`` (fields of :class:`TamingPrior`, e.g. ``heads=16``), which win.
        config: the taming ``*-project.yaml`` of the run.
        class_names: see :func:`from_taming_state_dict`.
    """
    if spec is None:
        facts = facts_from_project(config) if config is not None else {}
        spec = resolve_spec({**facts, **{k: v for k, v in overrides.items() if v is not None}}, class_names)
    checkpoint = load_legacy_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict (found {type(checkpoint).__name__})")
    return from_taming_state_dict(state, spec, class_names)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags' facts: --sos-token makes the model unconditional, --num-classes class-conditional."""
    given = {name: getattr(args, name) for name in ("heads", "resolution", "num_classes", "sos_token")}
    given = {k: v for k, v in given.items() if v is not None}
    if "sos_token" in given and "num_classes" in given:
        raise CheckpointError("--sos-token (unconditional) and --num-classes (class-conditional) exclude each other")
    if "sos_token" in given:
        given["condition"] = "sos"
    elif "num_classes" in given or args.class_names is not None:
        given["condition"] = "class"
    return given


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: convert a taming transformer checkpoint into a token prior pipeline directory."""
    parser = argparse.ArgumentParser(prog="python -m prior.convert", description=__doc__.split("\n")[0])
    parser.add_argument("source", choices=("taming",), help="where the weights come from")
    parser.add_argument("src", type=Path, help="the Net2NetTransformer .ckpt")
    parser.add_argument("out_dir", type=Path, help="the pipeline directory to write")
    parser.add_argument("--config", type=Path, help="the run's configs/*-project.yaml (heads, condition, resolution)")
    parser.add_argument("--resolution", type=int, help="training resolution (default: the config's, else 256)")
    parser.add_argument("--heads", type=int, help="attention heads (n_head), when there is no --config")
    parser.add_argument("--num-classes", type=int, help="a class-conditional model's number of classes")
    parser.add_argument("--sos-token", type=int, help="an unconditional model's start token (usually 0)")
    parser.add_argument("--class-names", type=Path, help="a file with one class name per line (prompts name classes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        names = read_class_names(args.class_names) if args.class_names is not None else None
        facts = facts_from_project(args.config) if args.config is not None else {}
        spec = resolve_spec({**facts, **_overrides(args)}, names)
        model = load_taming_checkpoint(args.src, spec, class_names=names)
    except (CheckpointError, ConfigError) as error:
        raise SystemExit(f"error: {error}") from error
    out = model.save_pretrained(args.out_dir)
    config = model.prior.config
    logger.info("wrote a %s prior (%d layers, width %d, %dx%d tokens over %d codes) to %s", config.condition,
                config.depth, config.width, config.grid_size, config.grid_size, config.codebook_size, out)
    return out


if __name__ == "__main__":
    main()
