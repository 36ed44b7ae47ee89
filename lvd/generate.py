"""``python -m lvd.generate``: prompt(s) → mp4 / gif with an :class:`lvd.pipeline.LVDPipeline` folder.

    python -m lvd.generate --prompt "a red circle moving right" --output out.mp4
    python -m lvd.generate --model runs/shapes/export --prompts-file prompts.txt --num-videos 2 --output out/clip.gif
    python -m lvd.generate --prompt "a red circle moving right" --image first.png --output out.mp4
    python -m lvd.generate --prompt "a red circle moving right" --video clip.mp4 --frames 33 --output longer.mp4

``--image`` starts every video at that picture (image-to-video; its size is the video's unless --height/--width
say otherwise, and then they must match). ``--video`` continues the clip: ``--frames`` is then the total length
(any count above the clip's), made by windows of ``--window-frames`` frames, each conditioned on the last
``--context-frames`` frames so far (:meth:`lvd.pipeline.LVDPipeline.extend`); the file starts with the clip's
own frames. Both work best with a model trained with clean frames (the stage-2 recipe's ``clean_frames``).

Every argument is checked before any sampling, and all problems are reported at once (exit status 2): among
them a non-finite --guidance, an output folder that cannot be created, a non-UTF-8 --prompts-file, and sizes
whose decoded videos alone would not fit in the memory available.
A frame count the VAE cannot produce (not 1 + 4k for a 4× temporal VAE) is an error naming the nearest
valid counts; it is never rounded. With several videos (several prompts and/or ``--num-videos``), files are
numbered ``<stem>_000<suffix>``, ``<stem>_001<suffix>``, … in prompt-major order. Video ``k`` is sampled from
``torch.Generator().manual_seed(seed + k)``, so the same arguments give the same files bit for bit on a CPU.

Across processes (GPUs), one generation at a time::

    torchrun --nproc_per_node 4 -m lvd.generate --prompt "…" --ulysses-degree 4 --output out.mp4
    torchrun --nproc_per_node 4 -m lvd.generate --prompt "…" --ulysses-degree 2 --ring-degree 2 --output out.mp4
    torchrun --nproc_per_node 4 -m lvd.generate --prompt "…" --ulysses-degree 2 --cfg-parallel --output out.mp4

``--ulysses-degree`` × ``--ring-degree`` processes share each video's tokens (context parallelism,
:mod:`lvd.context_parallel`), and ``--cfg-parallel`` runs guidance's unconditional and conditional branches on two
such groups (:mod:`lvd.pipeline.parallel`). Their product (× 2 with ``--cfg-parallel``) must equal torchrun's world
size: every process works on the same video, seeded alike, so the video does not depend on the process count (up to
float rounding). Rank 0 prints and writes the files; the other ranks write nothing. A bad combination (a product that
is not the world size, degrees without torchrun, heads not divisible by ``--ulysses-degree``, a token count not
divisible by the context size, ``--cfg-parallel`` without guidance) exits 2 on every rank before any process group is
joined, with the lines printed once, by rank 0 (torchrun itself then exits 1).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lvd.pipeline.clean_frames import as_video_frames
from lvd.config import UserError, folder_problem, run_cli
from lvd.diffusion import SAMPLERS
from lvd.pipeline import LVDPipeline
from lvd.pipeline.checks import clean_frame_problems
from lvd.video_io import VideoReadError, read_video, write_video

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "shapes-demo"
OUTPUT_SUFFIXES = (".mp4", ".gif")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PIPELINE_LAYOUT = "model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/"
# Flags the CLI refuses, each with the one to use instead: given one, it exits 2 with a line naming the replacement.
# They are registered (hidden) so that argparse's prefix matching cannot read --text as --text-encoder.
RENAMED_FLAGS = {"--text": "--prompt", "--output_path": "--output"}


class UsageError(UserError, ValueError):
    """Bad command-line input, found before sampling."""


class _RenamedFlag(argparse.Action):
    """A flag of :data:`RENAMED_FLAGS`: exit 2 with one line naming the flag to use (no usage, no traceback)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        use = RENAMED_FLAGS[option_string]
        parser.exit(2, f"{parser.prog}: error: {option_string} is not an option; use {use}\n")


@dataclass
class GenerateArgs:
    prompts: list[str]
    output: Path
    model: Path
    negative_prompt: str | None
    steps: int
    guidance: float
    seed: int
    frames: int
    height: int
    width: int
    fps: float
    sampler: str | None
    num_videos: int
    batch_size: int
    device: str
    dtype: str
    offload: bool
    threads: int
    text_encoder: str | None = None
    loras: list[tuple[Path, float]] = field(default_factory=list)  # (adapter file or folder, scale)
    image: torch.Tensor | None = None  # --image as (3, 1, H, W) in [-1, 1]
    video: torch.Tensor | None = None  # --video as (3, T, H, W) in [-1, 1]
    window_frames: int = 17
    context_frames: int = 9
    ulysses_degree: int = 1  # processes sharing each video's tokens: ulysses_degree x ring_degree
    ring_degree: int = 1
    cfg_parallel: bool = False  # guidance's two branches on two groups of those
    rank: int = 0  # torchrun's RANK and WORLD_SIZE (0 and 1 in one process)
    world_size: int = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lvd.generate", description="Generate videos from text prompts.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", default=None, help='the prompt ("" = unconditional)')
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line (blank lines skipped)")
    p.add_argument("--output", default="out.mp4", help="file to write: .mp4 or .gif")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help=f"pipeline folder ({PIPELINE_LAYOUT})")
    p.add_argument("--negative-prompt", default=None, help="text to steer away from (replaces the null text in CFG)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="video k uses seed + k")
    p.add_argument("--frames", type=int, default=17, help="frames: 1 + k × the VAE's temporal factor")
    p.add_argument("--height", type=int, default=None, help="default: 64, or the size of --image / --video")
    p.add_argument("--width", type=int, default=None, help="default: 64, or the size of --image / --video")
    p.add_argument("--image", default=None, metavar="PNG", help="start every video at this image (image-to-video)")
    p.add_argument("--video", default=None, metavar="MP4",
                   help="continue this clip; --frames is then the total length (any count above the clip's)")
    p.add_argument("--window-frames", type=int, default=17, help="with --video: frames generated per window")
    p.add_argument("--context-frames", type=int, default=9,
                   help="with --video: the last frames each window continues from (1 + 4·j for a 4× VAE)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)}; default: the saved scheduler")
    p.add_argument("--num-videos", type=int, default=1, help="videos per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="videos denoised together")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, …")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is fastest on a CPU shared with busy processes")
    p.add_argument("--offload", action="store_true", help="model CPU offload (accelerate) on a GPU, for large models")
    p.add_argument("--lora", action="append", default=[], metavar="PATH",
                   help="a LoRA adapter (its folder or .safetensors file) to apply; repeat for several")
    p.add_argument("--lora-scale", action="append", type=float, default=[], metavar="S",
                   help="weight of each --lora, in order (one value: all of them; default 1)")
    p.add_argument("--ulysses-degree", type=int, default=1,
                   help="under torchrun: processes that split each video's tokens by heads (Ulysses all-to-all)")
    p.add_argument("--ring-degree", type=int, default=1,
                   help="under torchrun: processes that split each video's tokens and pass keys/values (ring)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="under torchrun: guidance's unconditional and conditional branches on two process groups")
    p.add_argument("--text-encoder", default=None, metavar="PATH_OR_NAME",
                   help="load the text encoder from here instead of the model folder's text_encoder_id (which may "
                        "only name a packaged encoder, a folder inside the model folder or a cached hub id)")
    for flag in RENAMED_FLAGS:
        p.add_argument(flag, action=_RenamedFlag)
    return p


# --------------------------------------------------------------------------------------------------
# 1. Checks that need no model
# --------------------------------------------------------------------------------------------------


def _writable_problem(output: Path) -> str | None:
    """Why ``output`` cannot be written, or None. Missing parent folders are fine if they can be created."""
    if output.is_dir():
        return f"--output {output} is a folder; give a file name ending in .mp4 or .gif"
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        return f"--output {output}: the suffix must be .mp4 or .gif, got '{output.suffix or '(none)'}'"
    if output.exists() and not os.access(output, os.W_OK):
        return f"--output {output} exists and is not writable"
    return folder_problem("--output", output, output.parent)


def _available_memory() -> int | None:
    """Bytes of RAM free for this process: MemAvailable from /proc/meminfo, else all physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _memory_problem(ns: argparse.Namespace, videos: int) -> str | None:
    """Refuse sizes whose decoded videos alone (float32 RGB, one batch) exceed the memory available.

    Only the output tensor is counted, so a size that passes may still run out of memory in the VAE;
    one that fails could never have finished.
    """
    if min(ns.frames, ns.height, ns.width, ns.batch_size, videos) <= 0:
        return None  # reported by the other checks
    batch = min(ns.batch_size, videos)
    need = batch * ns.frames * ns.height * ns.width * 3 * 4
    available = _available_memory()
    if available is None or need <= available:
        return None
    return (f"--frames {ns.frames} --height {ns.height} --width {ns.width}: the decoded videos need "
            f"{need / 2**30:,.1f} GiB ({batch} per batch x frames x height x width x 3 x 4 bytes), more than the "
            f"{available / 2**30:,.1f} GiB of memory available; lower them (or --batch-size)")


def _model_problem(model: Path) -> str | None:
    if (model / "model_index.json").is_file():
        return None
    if model.resolve() == DEFAULT_MODEL.resolve():
        return (f"the bundled demo pipeline {DEFAULT_MODEL} does not exist yet (it is built by the shapes-demo "
                f"recipe); point --model at a pipeline folder ({PIPELINE_LAYOUT}), e.g. one written by "
                f"LVDPipeline.save_pretrained or a training run's export")
    if not model.exists():
        return f"--model {model}: no such folder; give a pipeline folder ({PIPELINE_LAYOUT})"
    return f"--model {model} is not a pipeline folder: it has no model_index.json ({PIPELINE_LAYOUT})"


def _read_frames(flag: str, path: str) -> torch.Tensor:
    """The file ``path`` as frames (3, T, H, W) in [-1, 1]: an image (T = 1) for --image, a video for --video;
    UsageError (one line) when it cannot be read."""
    if flag == "--image":
        import PIL.Image

        try:
            with PIL.Image.open(path) as img:
                return as_video_frames(img.convert("RGB"), "--image")
        except (OSError, ValueError) as err:  # missing, unreadable, not an image (PIL.UnidentifiedImageError)
            raise UsageError(f"--image {path}: cannot read it as an image ({str(err).splitlines()[0]})") from None
    try:
        return as_video_frames(read_video(path), "--video")
    except (VideoReadError, ValueError) as err:
        raise UsageError(f"--video {path}: cannot read it as a video ({str(err).splitlines()[0]})") from None


def _conditioning_inputs(ns: argparse.Namespace, problems: list[str]):
    """Read --image / --video, take --height/--width from them unless given (then they must match), and check
    the lengths of a continuation; appends to ``problems``. Returns (image, video), each frames or None."""
    image = video = None
    if ns.image is not None and ns.video is not None:
        problems.append("give --image or --video, not both")
        ns.image = ns.video = None  # nothing more to check about them
    flag, path = ("--image", ns.image) if ns.image is not None else ("--video", ns.video)
    if path is not None:
        try:
            frames = _read_frames(flag, path)
        except UsageError as err:
            problems.append(str(err))
            frames = None
        if frames is not None:
            h, w = frames.shape[2:]
            height, width = h if ns.height is None else ns.height, w if ns.width is None else ns.width
            if (height, width) != (h, w):
                problems.append(f"{flag} {path} is {w}x{h} (width x height) but --width/--height ask for "
                                f"{width}x{height}; resize it or leave them out")
            if flag == "--video" and frames.shape[1] < ns.context_frames:
                problems.append(f"--video {path} has {frames.shape[1]} frames; continuing it needs at least "
                                f"--context-frames {ns.context_frames}")
            if flag == "--video" and ns.frames <= frames.shape[1]:
                problems.append(f"--frames {ns.frames} is the total length with --video: it must be more than the "
                                f"video's {frames.shape[1]} frames")
            if flag == "--video" and not 1 <= ns.context_frames < ns.window_frames:
                problems.append(f"--context-frames {ns.context_frames} must be at least 1 and fewer than "
                                f"--window-frames {ns.window_frames}")
            ns.height, ns.width = height, width
            image, video = (frames, None) if flag == "--image" else (None, frames)
    ns.height = 64 if ns.height is None else ns.height
    ns.width = 64 if ns.width is None else ns.width
    return image, video


def _launch() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) as torchrun sets them in the environment; None without torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ.get("LOCAL_RANK", rank)), int(os.environ["WORLD_SIZE"])


def _parallel_problems(ns: argparse.Namespace, world: int | None) -> list[str]:
    """The process layout's problems: positive degrees whose product (x 2 with --cfg-parallel) is torchrun's world
    size (``world``; None without torchrun, where the product must be 1), and guidance for --cfg-parallel."""
    u, r = ns.ulysses_degree, ns.ring_degree
    problems = [f"{flag} must be a positive integer, got {value}"
                for flag, value in (("--ulysses-degree", u), ("--ring-degree", r)) if value < 1]
    if ns.cfg_parallel and not ns.guidance > 1:
        problems.append(f"--cfg-parallel runs guidance's two branches on two processes: it needs --guidance above 1, "
                        f"got {ns.guidance:g}")
    if problems:
        return problems
    n = u * r * (2 if ns.cfg_parallel else 1)
    layout = f"--ulysses-degree {u} x --ring-degree {r}{' x 2 (--cfg-parallel)' if ns.cfg_parallel else ''} = {n}"
    if world is None and n > 1:
        problems.append(f"{layout} processes: launch them with torchrun --nproc_per_node {n} -m lvd.generate …")
    elif world is not None and n != world:
        problems.append(f"{layout} processes, but torchrun started {world} (WORLD_SIZE): use --nproc_per_node {n}, "
                        f"or degrees whose product is {world}")
    return problems


def parse_args(argv: list[str] | None = None) -> GenerateArgs:
    """Parse and check everything that does not need the model; raise UsageError listing every problem."""
    ns = build_parser().parse_args(argv)
    problems = []
    prompts: list[str] = []
    if ns.prompt is not None and ns.prompts_file is not None:
        problems.append("give --prompt or --prompts-file, not both")
    elif ns.prompts_file is not None:
        try:
            lines = Path(ns.prompts_file).read_text(encoding="utf-8").splitlines()
            prompts = [line.strip() for line in lines if line.strip()]
            if not prompts:
                problems.append(f"--prompts-file {ns.prompts_file} has no prompts")
        except OSError as err:
            problems.append(f"--prompts-file {ns.prompts_file}: {err.strerror or err}")
        except UnicodeDecodeError as err:
            problems.append(f"--prompts-file {ns.prompts_file} is not UTF-8 text (byte {err.start})")
    elif ns.prompt is not None:
        prompts = [ns.prompt]
    else:
        problems.append('give --prompt "…" (an empty "" is the unconditional video) or --prompts-file FILE')
    if ns.steps <= 0:
        problems.append(f"--steps must be a positive integer, got {ns.steps}")
    if not (math.isfinite(ns.guidance) and ns.guidance >= 0):
        problems.append(f"--guidance must be a finite number >= 0, got {ns.guidance}")
    if ns.num_videos <= 0:
        problems.append(f"--num-videos must be a positive integer, got {ns.num_videos}")
    if ns.batch_size <= 0:
        problems.append(f"--batch-size must be a positive integer, got {ns.batch_size}")
    if not (math.isfinite(ns.fps) and ns.fps > 0):
        problems.append(f"--fps must be a finite number > 0, got {ns.fps}")
    if ns.threads < 0:
        problems.append(f"--threads must be >= 0, got {ns.threads}")
    if ns.seed < 0:
        problems.append(f"--seed must be >= 0, got {ns.seed}")
    scales = ns.lora_scale * len(ns.lora) if len(ns.lora_scale) == 1 else ns.lora_scale or [1.0] * len(ns.lora)
    if len(scales) != len(ns.lora):
        problems.append(f"--lora-scale given {len(ns.lora_scale)} times for {len(ns.lora)} --lora: give one, or one "
                        "per --lora")
    problems += [f"--lora-scale must be a finite number, got {v}" for v in ns.lora_scale if not math.isfinite(v)]
    problems += [f"--lora {path}: no such file or folder" for path in ns.lora if not Path(path).exists()]
    if ns.sampler is not None and ns.sampler not in SAMPLERS:
        problems.append(f"--sampler {ns.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    device = ns.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        problems.append(f"--device {device}: no CUDA GPU is available (use --device cpu)")
    elif not (device == "cpu" or device.startswith(("cuda", "mps", "xpu"))):
        problems.append(f"--device {device!r} is not a device (cpu, cuda, cuda:N)")
    launch = _launch()
    rank, local_rank, world = launch or (0, 0, 1)
    problems += _parallel_problems(ns, None if launch is None else world)
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"  # every process its own GPU
    elif world > 1 and device != "cpu":
        problems.append(f"--device {ns.device}: under torchrun every process takes its own GPU, cuda:LOCAL_RANK; give "
                        "--device auto, cuda or cpu")
    if ns.offload and not device.startswith("cuda"):
        problems.append("--offload needs a CUDA GPU: it keeps models on the CPU and moves each to the GPU in turn")
    dtype = ns.dtype
    if dtype == "auto":  # fp32 on a CPU (bf16 matmul runs at ~0.3 GFLOP/s there), bf16 where the GPU has it
        dtype = "float32" if not device.startswith("cuda") else (
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    image, video = _conditioning_inputs(ns, problems)
    problems += filter(None, [_memory_problem(ns, len(prompts) * ns.num_videos), _writable_problem(Path(ns.output)),
                              _model_problem(Path(ns.model))])
    if problems:
        raise UsageError("\n".join(f"  - {p}" for p in problems))
    return GenerateArgs(prompts=prompts, output=Path(ns.output), model=Path(ns.model),
                        negative_prompt=ns.negative_prompt, steps=ns.steps, guidance=ns.guidance, seed=ns.seed,
                        frames=ns.frames, height=ns.height, width=ns.width, fps=ns.fps, sampler=ns.sampler,
                        num_videos=ns.num_videos, batch_size=ns.batch_size, device=device, dtype=dtype,
                        offload=ns.offload, threads=ns.threads, text_encoder=ns.text_encoder,
                        loras=list(zip(map(Path, ns.lora), scales)), image=image, video=video,
                        window_frames=ns.window_frames, context_frames=ns.context_frames,
                        ulysses_degree=ns.ulysses_degree, ring_degree=ns.ring_degree, cfg_parallel=ns.cfg_parallel,
                        rank=rank, world_size=world)


# --------------------------------------------------------------------------------------------------
# 2. Load the pipeline and check what depends on it
# --------------------------------------------------------------------------------------------------


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype argument: none for float32 (the saved dtype), ``dtype=`` where diffusers has
    renamed ``torch_dtype=`` (it keeps fp32-only modules in fp32, which a later ``.to(dtype)`` would not)."""
    if dtype == torch.float32:
        return {}
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def _context_problems(args: GenerateArgs, pipe: LVDPipeline, frames: int, check_tokens: bool) -> list[str]:
    """What the transformer cannot split across --ulysses-degree x --ring-degree processes: heads not divisible by
    the Ulysses degree, ring with factorized attention, and (``check_tokens``: once the sizes are valid) a token count
    not divisible by the context size."""
    from lvd.context_parallel import ContextParallelConfig

    cfg = ContextParallelConfig(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)
    config = pipe.transformer.config
    problems = [re.sub(r"distributed\.(ulysses|ring)_degree=", r"--\1-degree ", p)  # the flags' names
                for p in cfg.problems(num_heads=config.num_heads, attention_mode=config.attention_mode)]
    if check_tokens:
        grid = [n // p for n, p in zip(pipe.video_vae.latent_shape(frames, args.height, args.width)[1:],
                                       pipe.patch_size)]
        tokens = math.prod(grid)
        if tokens % cfg.size:
            flags = "--window-frames/--height/--width" if args.video is not None else "--frames/--height/--width"
            problems.append(f"{flags} give {' x '.join(map(str, grid))} = {tokens} tokens, not divisible by "
                            f"--ulysses-degree x --ring-degree = {cfg.size}: choose sizes whose token count is")
    return problems


def load_pipeline(args: GenerateArgs) -> LVDPipeline:
    """Load the pipeline onto the device and check sizes and the sampler against it (UsageError)."""
    if args.dtype != "float32" and args.device == "cpu" and args.rank == 0:
        print(f"note: --dtype {args.dtype} on a CPU is very slow (bf16 matmul ~0.3 GFLOP/s here); float32 is the "
              "CPU default", file=sys.stderr)
    try:
        text = {"text_encoder_id": args.text_encoder} if args.text_encoder else {}
        pipe = LVDPipeline.from_pretrained(str(args.model), **text, **_dtype_kwarg(DTYPES[args.dtype]))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UsageError(f"  - --model {args.model}: could not load the pipeline: {err}") from err
    for k, (path, _) in enumerate(args.loras):
        try:
            pipe.load_lora_weights(path, adapter_name=f"lora_{k}")
        except ValueError as err:
            raise UsageError(f"  - --lora: {err}") from err
    if args.loras:
        pipe.set_adapters([f"lora_{k}" for k in range(len(args.loras))], [scale for _, scale in args.loras])
    frames = args.window_frames if args.video is not None else args.frames  # --video: --frames is the total
    flags = "--window-frames/--height/--width" if args.video is not None else "--frames/--height/--width"
    problems = [f"{flags}: {p}" for p in pipe.size_problems(frames, args.height, args.width)]
    if args.image is not None or args.video is not None:
        given = args.image if args.image is not None else args.video[:, -args.context_frames:]
        what, flag = ("image", "--image") if args.image is not None else ("video", "--context-frames")
        problems += [f"{flag}: {p}" for p in clean_frame_problems(what, tuple(given.shape[1:]), pipe.video_vae,
                                                                   pipe.patch_size[0], frames, args.height, args.width)]
    if args.ulysses_degree * args.ring_degree > 1:
        problems += _context_problems(args, pipe, frames, check_tokens=not problems)
    if args.sampler is not None:
        try:
            pipe.set_sampler(args.sampler)
        except ValueError as err:
            problems.append(f"--sampler: {err} (objective from {args.model / 'scheduler' / 'scheduler_config.json'})")
    if problems:
        raise UsageError("\n".join(f"  - {p}" for p in problems))
    if args.offload:
        pipe.enable_model_cpu_offload(device=args.device)
    else:
        pipe.to(args.device)
    return pipe


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.mp4`` for one video; ``out_000.mp4``, ``out_001.mp4``, … for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{k:03d}{output.suffix}") for k in range(count)]


# --------------------------------------------------------------------------------------------------
# 3. Generate
# --------------------------------------------------------------------------------------------------


def generate(args: GenerateArgs, pipe: LVDPipeline) -> tuple[list[Path], dict[str, float]]:
    """Sample every (prompt, k) video, write the files (rank 0 only), and return their paths and the stage
    timings."""
    jobs = [(prompt, n) for prompt in args.prompts for n in range(args.num_videos)]  # prompt-major
    paths = output_paths(args.output, len(jobs))
    timings = {"text_encoding": 0.0, "denoising": 0.0, "decoding": 0.0, "writing": 0.0}
    batch_size = 1 if args.video is not None else args.batch_size  # a continuation is one video at a time
    loops = 0  # denoising loops run (one per batch, or per continuation window)
    for start in range(0, len(jobs), batch_size):
        chunk = range(start, min(start + batch_size, len(jobs)))
        generators = [torch.Generator().manual_seed(args.seed + k) for k in chunk]
        common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, generator=generators, output_type="pt")
        if args.video is not None:
            result = pipe.extend(args.video, jobs[start][0], num_frames=args.frames, window_frames=args.window_frames,
                                 context_frames=args.context_frames, **common)
        else:
            result = pipe([jobs[k][0] for k in chunk], num_frames=args.frames, height=args.height, width=args.width,
                          image=args.image, **common)
        for key in ("text_encoding", "denoising", "decoding"):
            timings[key] += result.timings[key]
        loops += result.timings.get("windows", 1)  # a continuation denoises once per window
        began = time.perf_counter()
        written = result.frames if args.rank == 0 else []  # the other ranks hold the same frames
        for k, frames in zip(chunk, written):  # frames (T, 3, H, W) in [0, 1]
            video = (frames.float().permute(1, 0, 2, 3) * 255).round().to(torch.uint8).cpu()  # (3, T, H, W)
            write_video(paths[k], video, fps=args.fps)
            print(f"wrote {paths[k]}  ({args.frames} frames, {args.width}x{args.height}, {args.fps:g} fps)  "
                  f"prompt: {jobs[k][0]!r}")
        timings["writing"] += time.perf_counter() - began
    timings["denoising_per_step"] = timings["denoising"] / (args.steps * max(loops, 1))
    timings["loops"] = loops
    return paths, timings


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.rank:
            _quiet()
        began = time.perf_counter()
        pipe = load_pipeline(args)
        loading = time.perf_counter() - began
    except UsageError as err:
        if (_launch() or (0,))[0] == 0:  # every rank finds the same problems; one prints them
            print(f"python -m lvd.generate: cannot start:\n{err}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    leave = _join_processes(args, pipe) if args.world_size > 1 else (lambda: None)
    loading += time.perf_counter() - began
    try:
        _, timings = generate(args, pipe)
    finally:
        leave()
    if args.rank == 0:
        windows = f" x {timings['loops']} windows" if args.video is not None else ""
        print(f"timings: loading {loading:.2f} s | text encoding {timings['text_encoding']:.2f} s | "
              f"denoising {timings['denoising']:.2f} s ({timings['denoising_per_step']:.3f} s/step, {args.steps} steps"
              f"{windows}) | "
              f"decoding {timings['decoding']:.2f} s | writing {timings['writing']:.2f} s")
    return 0


def _quiet() -> None:
    """No progress bars or info logs from diffusers and transformers: on ranks other than 0 they repeat rank 0's."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def _join_processes(args: GenerateArgs, pipe: LVDPipeline):
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA) and split the pipeline across it (every rank the
    same way); returns the function that leaves the group."""
    from lvd.train.distributed import DistributedConfig, init_distributed, shutdown

    init_distributed(DistributedConfig(strategy="none", device="cuda" if args.device.startswith("cuda") else "cpu"))
    pipe.enable_parallelism(args.ulysses_degree, args.ring_degree, args.cfg_parallel)
    if args.rank:
        pipe.set_progress_bar_config(disable=True)
    return shutdown


if __name__ == "__main__":
    run_cli(main, prog="python -m lvd.generate")
