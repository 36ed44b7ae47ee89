"""Generation across processes with gloo on CPU: ``torchrun … -m lvd.generate --ulysses-degree/--ring-degree/
--cfg-parallel`` writes the one-process video (rank 0 only), ``LVDPipeline.enable_parallelism`` and diffusers'
``transformer.enable_parallelism(config=ContextParallelConfig(...))`` give the one-process frames, and the layouts that
cannot work are one-line errors (exit 2) before any process group is joined.

torchrun launches this file itself (``__main__`` below): each rank runs ``python -m lvd.generate`` in its own folder
with its own log, so the test sees which rank wrote and printed what.
"""

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lvd import generate
from lvd.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
# 32 x 32 pixels, 5 frames: latents (4, 2, 8, 8), 2 x 4 x 4 = 32 tokens of 1 x 2 x 2; 2 heads
ARGS = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "3", "--device", "cpu", "--threads", "1",
        "--prompt", "a red circle moving right"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    """The video one process writes."""
    out = tmp_path_factory.mktemp("one") / "out.mp4"
    assert generate.main(["--model", str(model_dir), *ARGS, "--output", str(out)]) == 0
    return read_video(out)


def _torchrun(nproc: int, run_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [*TORCHRUN, "--nproc_per_node", str(nproc), str(Path(__file__).resolve()), str(run_dir), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("nproc, flags", [
    (2, ["--ulysses-degree", "2"]),
    (2, ["--cfg-parallel"]),
    pytest.param(2, ["--ring-degree", "2"], marks=pytest.mark.slow),  # ring: also the Python API test's
    (4, ["--ulysses-degree", "2", "--cfg-parallel"]),
], ids=["ulysses2", "cfg_parallel", "ring2", "ulysses2_x_cfg_parallel"])
def test_torchrun_generate_writes_the_one_process_video_from_rank_0_only(model_dir, one_process, tmp_path, nproc,
                                                                         flags):
    proc = _torchrun(nproc, tmp_path, "--model", str(model_dir), *ARGS, "--output", "out.mp4", *flags)
    logs = {r: (tmp_path / f"rank{r}.log").read_text() for r in range(nproc)}
    assert proc.returncode == 0, proc.stderr[-3000:] + json.dumps(logs)[-3000:]
    video = read_video(tmp_path / "rank0" / "out.mp4")
    assert video.shape == one_process.shape == (3, 5, 32, 32)
    assert (video.int() - one_process.int()).abs().max() <= 1  # within one 8-bit level (seen: 0, the same bytes)
    assert "wrote out.mp4" in logs[0] and "timings:" in logs[0]
    for r in range(1, nproc):
        assert list((tmp_path / f"rank{r}").iterdir()) == [], r  # the other ranks write nothing …
        assert logs[r] == "", (r, logs[r])  # … and print nothing


def test_a_bad_layout_under_torchrun_is_one_line_from_rank_0(model_dir, tmp_path):
    proc = _torchrun(2, tmp_path, "--model", str(model_dir), *ARGS, "--output", "out.mp4", "--ulysses-degree", "4")
    assert proc.returncode != 0  # every rank exits 2; torchrun reports it as its own 1
    assert (tmp_path / "rank0.log").read_text().splitlines() == [
        "python -m lvd.generate: cannot start:",
        "  - --ulysses-degree 4 x --ring-degree 1 = 4 processes, but torchrun started 2 (WORLD_SIZE): use "
        "--nproc_per_node 4, or degrees whose product is 2"]
    assert (tmp_path / "rank1.log").read_text() == ""
    assert "exitcode  : 2" in proc.stderr


# --------------------------------------------------------------------------------------------------
# Layouts that cannot work: checked in one process with torchrun's environment set, before any process group


@pytest.mark.parametrize("world, argv, message", [
    (None, ["--ulysses-degree", "2"], "--ulysses-degree 2 x --ring-degree 1 = 2 processes: launch them with torchrun "
                                      "--nproc_per_node 2 -m lvd.generate"),
    (None, ["--cfg-parallel"], "x 2 (--cfg-parallel) = 2 processes: launch them with torchrun"),
    (4, ["--ulysses-degree", "2"], "= 2 processes, but torchrun started 4 (WORLD_SIZE): use --nproc_per_node 2"),
    (2, [], "= 1 processes, but torchrun started 2"),
    (2, ["--cfg-parallel", "--guidance", "1"], "--cfg-parallel runs guidance's two branches on two processes: it "
                                               "needs --guidance above 1, got 1"),
    (2, ["--ulysses-degree", "0"], "--ulysses-degree must be a positive integer, got 0"),
    (4, ["--ulysses-degree", "4"], "--ulysses-degree 4 does not divide the model's num_heads=2"),
    (2, ["--ulysses-degree", "2", "--frames", "9", "--height", "24", "--width", "24"],
     "--frames/--height/--width give 3 x 3 x 3 = 27 tokens, not divisible by --ulysses-degree x --ring-degree = 2"),
    (2, ["--ulysses-degree", "2", "--device", "cuda:1"], "--device cuda:1: under torchrun every process takes its own "
                                                         "GPU, cuda:LOCAL_RANK"),
], ids=["degree_without_torchrun", "cfg_without_torchrun", "product_below_world", "no_flags_under_torchrun",
        "cfg_without_guidance", "degree_0", "heads", "tokens", "fixed_gpu"])
def test_layouts_that_cannot_work_exit_2_naming_the_flags(model_dir, tmp_path, capsys, monkeypatch, world, argv,
                                                          message):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if world is not None:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    out = tmp_path / "out.mp4"
    assert generate.main(["--model", str(model_dir), *ARGS, "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists()


def test_other_ranks_exit_2_without_printing(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert generate.main(["--model", str(model_dir), *ARGS, "--output", str(tmp_path / "o.mp4")]) == 2
    assert capsys.readouterr() == ("", "")


# --------------------------------------------------------------------------------------------------
# The Python API: LVDPipeline.enable_parallelism, and diffusers' call on the transformer


def _worker(rank, world, port, model_dir, path):
    import torch.distributed as dist
    from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from lvd.pipeline import LVDPipeline

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def load():
        pipe = LVDPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def frames(pipe, **kwargs):
        kwargs = dict(num_frames=5, height=32, width=32, num_inference_steps=3, output_type="pt", **kwargs)
        return pipe("a red circle moving right", generator=torch.Generator().manual_seed(0), **kwargs).frames

    image = torch.rand(3, 32, 32) * 2 - 1
    results = {}
    for name, enable, kwargs in [
        ("ulysses2", lambda p: p.enable_parallelism(ulysses_degree=2), {}),
        ("ring2_image", lambda p: p.enable_parallelism(ring_degree=2), {"image": image}),
        ("cfg_parallel", lambda p: p.enable_parallelism(cfg_parallel=True), {}),
        ("cfg_parallel_two_videos", lambda p: p.enable_parallelism(cfg_parallel=True), {"num_videos_per_prompt": 2}),
        ("cfg_parallel_one_row", lambda p: p.enable_parallelism(cfg_parallel=True), {"guidance_scale": 1.0}),
        ("diffusers_ulysses2", lambda p: p.transformer.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=2)), {}),
        ("diffusers_ring2", lambda p: p.transformer.enable_parallelism(
            config=ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))), {}),
    ]:
        expected = frames(load(), **kwargs)
        pipe = load()
        enable(pipe)
        got = frames(pipe, **kwargs)
        results[name] = (got - expected).abs().max().item()
    errors = {}
    for name, call in [
        ("twice", lambda p: (p.enable_parallelism(ulysses_degree=2), p.enable_parallelism(ulysses_degree=2))),
        ("diffusers_after_pipeline", lambda p: (p.enable_parallelism(ulysses_degree=2),
                                                p.transformer.enable_parallelism(
                                                    config=ContextParallelConfig(ulysses_degree=2)))),
        ("too_many", lambda p: p.enable_parallelism(ulysses_degree=2, cfg_parallel=True)),
        ("diffusers_too_many", lambda p: p.transformer.enable_parallelism(
            config=ContextParallelConfig(ulysses_degree=4))),
        ("tensor_parallel", lambda p: p.transformer.enable_parallelism(config=TensorParallelConfig(tp_degree=2))),
        ("diffusers_mesh_mismatch", lambda p: p.transformer.enable_parallelism(config=ContextParallelConfig(
            ulysses_degree=2, mesh=init_device_mesh("cpu", (2, 1), mesh_dim_names=("ring", "ulysses"))))),
        ("cp_plan", lambda p: p.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2),
                                                               cp_plan={})),
    ]:
        try:
            call(load())
            errors[name] = None
        except Exception as err:  # noqa: BLE001 (the test names the type)
            errors[name] = f"{type(err).__name__}: {err}"
    if rank == 0:
        Path(path).write_text(json.dumps({"frames": results, "errors": errors}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_api_and_diffusers_call_give_the_one_process_frames(model_dir, tmp_path):
    path = tmp_path / "results.json"
    mp.spawn(_worker, args=(2, _free_port(), str(model_dir), str(path)), nprocs=2)
    results = json.loads(path.read_text())
    for name, error in results["frames"].items():
        assert error < 1e-5, (name, error)  # frames in [0, 1]; seen: 0 (Ulysses) to 2.4e-6
    errors = results["errors"]
    assert errors["twice"].startswith("RuntimeError: LVDPipeline.enable_parallelism has already been applied")
    assert errors["diffusers_after_pipeline"].startswith("RuntimeError: parallelism is already applied to this "
                                                         "VideoDiT")
    assert "= 4 processes does not divide the world size 2" in errors["too_many"]
    assert "does not divide the world size 2" in errors["diffusers_too_many"]
    assert errors["tensor_parallel"].startswith("NotImplementedError: VideoDiT supports context parallelism only")
    assert "cp_plan= is not supported" in errors["cp_plan"]
    assert "the mesh's ring and ulysses dimensions {'ring': 2, 'ulysses': 1} must have the sizes ring_degree=1 and " \
           "ulysses_degree=2" in errors["diffusers_mesh_mismatch"]


def test_enable_parallelism_needs_a_process_group(model_dir):
    from diffusers import ContextParallelConfig

    from lvd.pipeline import LVDPipeline

    pipe = LVDPipeline.from_pretrained(model_dir)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialized first"):
        pipe.enable_parallelism(ulysses_degree=2)
    with pytest.raises(RuntimeError, match="torch.distributed must be initialized"):
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))


if __name__ == "__main__":
    # Run by torchrun: `python -m lvd.generate ARGS` in RUN_DIR/rank<R>/, its stdout and stderr in RUN_DIR/rank<R>.log
    run_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = os.environ["RANK"]
    (run_dir / f"rank{rank}").mkdir(parents=True)
    os.chdir(run_dir / f"rank{rank}")
    log = open(run_dir / f"rank{rank}.log", "w")  # noqa: SIM115 (open until the process ends)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.argv = ["lvd.generate", *argv]
    sys.modules.pop("lvd.generate")  # imported above; `-m` runs it afresh as __main__
    runpy.run_module("lvd.generate", run_name="__main__", alter_sys=True)
