"""Score a shapes latent diffusion model: prompt accuracy and diversity, printed as JSON.

    python -m diffusion.evaluate_shapes runs/shapes32_diffusion --guidance 4 --steps 20 --sampler dpmpp_2m
    python -m diffusion.evaluate_shapes runs/shapes32_diffusion --sweep 0,1,2,4,8     # prints a list
    python -m diffusion.evaluate_shapes runs/shapes32_diffusion --guidance 0 \
        --classifier runs/shapes32_classifier --classifier-sweep 0,1,3,10 --attribute colour

RUN_DIR is a training run directory (its ``pipeline/`` is used) or a pipeline directory. Accuracy is
the fraction of samples whose colour, shape and position the analytic shapes scorer finds right, over
a fixed set of prompts (:func:`common.evaluation.evaluate_shapes`, shared with the AR prior);
diversity is the mean pairwise RMS distance among the samples of one prompt.

A class-only run (``model.context_dim: 0``, trained on the shapes labels) is scored the same way: the
prompt of class c is its caption, so each prompt is sampled as the class it names, and the guidance
scale is that of the class against the null class (``"condition": "class"`` in the output).

With ``--classifier`` (a classifier component directory or a classifier run directory) every sample
is steered by classifier guidance towards the value its prompt names of the classifier's attribute
(e.g. the colour); ``guided_accuracy`` is the scorer's accuracy on that attribute. ``--guidance 0``
makes the text model unconditional, so only the classifier knows what was asked for. Sweeps over
``--sweep`` and ``--classifier-sweep`` run every combination.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from common.checkpoint import CheckpointError, find_pipeline_dir
from common.data.shapes import evaluation_prompts
from common.evaluation import evaluate_shapes, finite_number, number_list, whole_number
from diffusion.classifier import NoisyLatentClassifier
from diffusion.latent_diffusion import TRAIN_DIFFUSION, find_classifier_dir
from diffusion.samplers import SAMPLERS
from diffusion.schedules import SIGMA_SPACINGS
from pipelines.latent import LatentPipeline
from pipelines.loading import load_pipeline
from pipelines.text_to_image import ClassToImage


def pipeline_dir(path: str | Path) -> Path:
    """:func:`find_pipeline_dir` for the command line: a bad path exits with ``error: <why>``."""
    try:
        return find_pipeline_dir(path, TRAIN_DIFFUSION)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None


def classifier_dir(path: str | Path) -> Path:
    """:func:`find_classifier_dir` for the command line: a bad path exits with ``error: <why>``."""
    try:
        return find_classifier_dir(path)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, every number checked (a bad one exits with ``error: argument --steps: ...``);
    ``sweep`` and ``classifier_sweep`` come back as lists of floats ([] when not given)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count = whole_number(1)
    parser.add_argument("run_dir", help="training run directory or pipeline directory")
    parser.add_argument("--guidance", type=finite_number(), default=None,
                        help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--sweep", type=number_list, default="",
                        help="comma-separated guidance scales, e.g. 0,1,2,4,8 (overrides --guidance)")
    parser.add_argument("--steps", type=count, default=20, help="sampling steps")
    parser.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    parser.add_argument("--sigma-spacing", default="default", choices=SIGMA_SPACINGS,
                        help="noise levels to step through (karras, exponential: dpmpp_2m, euler, unipc only)")
    parser.add_argument("--prompts", type=count, default=32, help="number of fixed evaluation prompts")
    parser.add_argument("--samples", type=count, default=4, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--rescale", type=finite_number(0.0, 1.0), default=0.0, help="guidance rescale in [0, 1]")
    parser.add_argument("--negative", default="", help="negative prompt (default: the null prompt \"\")")
    parser.add_argument("--batch-size", type=count, default=64, help="images per sampling call")
    parser.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classifier", default="", help="classifier directory or run: classifier guidance")
    parser.add_argument("--classifier-scale", type=finite_number(), default=1.0, help="classifier guidance scale")
    parser.add_argument("--classifier-sweep", type=number_list, default="",
                        help="comma-separated classifier scales, e.g. 0,1,3,10 (overrides --classifier-scale)")
    parser.add_argument("--attribute", default="", help="check that the classifier predicts this attribute")
    return parser.parse_args(argv)


def load_classifier(args: argparse.Namespace) -> NoisyLatentClassifier | None:
    """The classifier of ``--classifier`` (None without one), checked against ``--attribute``."""
    if not args.classifier:
        if args.attribute or args.classifier_sweep:
            raise SystemExit("error: --attribute and --classifier-sweep need --classifier")
        return None
    classifier = NoisyLatentClassifier.from_pretrained(classifier_dir(args.classifier))
    if args.attribute and args.attribute != classifier.config.attribute:
        raise SystemExit(f"error: the classifier predicts {classifier.config.attribute!r}, not {args.attribute!r}")
    return classifier.to(args.device)


def load(run_dir: str | Path, device: str) -> LatentPipeline:
    """The diffusion pipeline of ``run_dir`` on ``device``, sampling in fp32 (so scores stay comparable with
    those of earlier runs, whatever the machine's precision="auto" picks)."""
    pipe = load_pipeline(pipeline_dir(run_dir)).to(device, precision="fp32")
    if not isinstance(pipe, LatentPipeline):
        raise SystemExit(f"error: {run_dir} holds a {type(pipe).__name__} pipeline; score token priors with "
                         f"python -m prior.evaluate_shapes")
    return pipe


def check_pipeline(pipe: LatentPipeline, args: argparse.Namespace) -> None:
    """Exit with ``error: <why>`` when the pipeline cannot be scored on shapes prompts as asked."""
    if not isinstance(pipe, ClassToImage):
        return
    if args.negative:
        raise SystemExit("error: --negative needs a text-conditioned model; this one is class-only (its "
                         "unconditional branch is the null class)")
    try:  # the class names of a shapes run are the captions the scorer asks for
        pipe.check_labels(evaluation_prompts(args.prompts))
    except ValueError as error:
        raise SystemExit(f"error: cannot score a class-only model on shapes prompts: {error}") from None


def evaluate(pipe: LatentPipeline, args: argparse.Namespace, guidance: float,
             classifier: NoisyLatentClassifier | None = None, classifier_scale: float = 0.0) -> dict:
    """Score one guidance scale (and classifier scale); the result repeats every setting that produced it."""
    by_class = isinstance(pipe, ClassToImage)  # class-only: the prompts are class names
    options = dict(num_inference_steps=args.steps, guidance_scale=guidance, guidance_rescale=args.rescale,
                   sampler=args.sampler, progress=False, output_type="latent")
    if args.sigma_spacing != "default":
        options["sigma_spacing"] = args.sigma_spacing
    if args.negative:
        options["negative_prompt"] = args.negative

    def generate(prompts: list[str], seed: int) -> torch.Tensor:
        steering = {}
        if classifier is not None:  # each prompt's own attribute value, e.g. "red" for "a small red circle ..."
            steering = dict(classifier=classifier, classifier_labels=classifier.targets_of(prompts),
                            classifier_scale=classifier_scale)
        latents = pipe(prompts, seed=seed, **options, **steering).images
        return pipe.model.decode(latents)  # in [-1, 1], as the scorer takes them

    start = time.perf_counter()
    scores = evaluate_shapes(generate, num_prompts=args.prompts, samples_per_prompt=args.samples, seed=args.seed,
                             batch_size=args.batch_size)
    settings = {"run_dir": str(args.run_dir), "condition": "class" if by_class else "text", "guidance": guidance,
                "steps": args.steps, "sampler": args.sampler, "sigma_spacing": args.sigma_spacing,
                "rescale": args.rescale, "negative": args.negative,
                "seed": args.seed}
    if classifier is not None:
        attribute = classifier.config.attribute
        settings.update(classifier=str(args.classifier), classifier_scale=classifier_scale, attribute=attribute)
        if attribute in scores:  # the scorer's accuracy on the steered attribute ("label" has none of its own)
            settings["guided_accuracy"] = scores[attribute]
    return {**settings, **scores, "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    classifier = load_classifier(args)
    classifier_scales = args.classifier_sweep or [args.classifier_scale]
    pipe = load(args.run_dir, args.device)
    check_pipeline(pipe, args)
    scales = args.sweep or [pipe.default_guidance_scale if args.guidance is None else args.guidance]
    results = [evaluate(pipe, args, scale, classifier, classifier_scale)
               for scale in scales for classifier_scale in classifier_scales]
    json.dump(results if args.sweep or args.classifier_sweep else results[0], sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
