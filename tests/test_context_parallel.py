"""Context parallelism (lvd.context_parallel) with gloo on CPU: the forward output and every parameter's gradient of
a context-parallel VideoDiT equal one process's, for Ulysses, ring and both, full and factorized attention, cross and
concat text with a padding mask, clean-frame conditioning and gradient checkpointing; and the configs that cannot
work are refused."""

import copy
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lvd.context_parallel import ContextParallelConfig

TOL = 1e-5  # output: max abs error; gradients: max abs error over the parameter's largest gradient entry
# name: (model overrides, ulysses_degree, ring_degree)
CASES_2 = {
    "ulysses_full_cross": ({}, 2, 1),
    "ulysses_full_concat_mask": ({"text_attention": "concat"}, 2, 1),
    "ulysses_factorized": ({"attention_mode": "factorized"}, 2, 1),
    "ulysses_factorized_concat": ({"attention_mode": "factorized", "text_attention": "concat"}, 2, 1),
    "ulysses_clean_frames": ({"clean_frame_conditioning": True, "abs_pos_embed": True}, 2, 1),
    "ring_full_cross": ({}, 1, 2),
    "ring_full_concat_mask": ({"text_attention": "concat"}, 1, 2),
    "ring_clean_frames": ({"clean_frame_conditioning": True}, 1, 2),
    "ulysses_checkpointing": ({"gradient_checkpointing": True}, 2, 1),
    "ring_checkpointing": ({"gradient_checkpointing": True}, 1, 2),
}
CASES_4 = {
    "ulysses2_ring2_concat": ({"text_attention": "concat"}, 2, 2),
    "ulysses4": ({}, 4, 1),
    "ring4": ({}, 1, 4),
    "context2_data2": ({"attention_mode": "factorized"}, 2, 1),
}


def _inputs(clean: bool):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 4, 8, 8, generator=g)  # 4 x 4 x 4 patches of 1x2x2: 64 tokens
    text = torch.randn(2, 6, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)  # padding in both rows
    kwargs = dict(text_states=text, text_mask=mask, text_pooled=torch.randn(2, 16, generator=g))
    if clean:
        kwargs["clean_frames"] = torch.tensor([1, 2])
    return latents, torch.tensor([250.0, 700.0]), kwargs


def _model(overrides):
    from lvd.dit import VideoDiT

    torch.manual_seed(0)
    overrides = dict(overrides)
    checkpointing = overrides.pop("gradient_checkpointing", False)  # the split hooks run again in the recompute
    model = VideoDiT(in_channels=4, hidden_size=64, depth=2, num_heads=4, text_dim=16, pooled_dim=16, **overrides)
    if checkpointing:
        model.enable_gradient_checkpointing()
    with torch.no_grad():  # adaLN-Zero starts every block at the identity; make the blocks do something
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _run(model, overrides):
    latents, t, kwargs = _inputs(overrides.get("clean_frame_conditioning", False))
    out = model(latents, t, **kwargs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weight).sum().backward()
    return out.detach()


def _worker(rank, world, port, cases, path):
    import torch.distributed as dist

    from lvd.context_parallel import context_mesh, parallelize_context, reduce_context_gradients

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for name, (overrides, u, r) in cases.items():
        reference = _model(overrides)
        parallel = copy.deepcopy(reference)
        expected = _run(reference, overrides)
        mesh = context_mesh(ContextParallelConfig(ulysses_degree=u, ring_degree=r), device_type="cpu")
        parallelize_context(parallel, mesh)
        got = _run(parallel, overrides)
        reduce_context_gradients(parallel, mesh)
        # error relative to the largest gradient entry of each parameter (they reach ~40 here; fp32 sums in
        # another order differ by ~1e-7 of that)
        grads = [(n, ((p.grad - q.grad).abs().max() / q.grad.abs().max().clamp_min(1e-12)).item()) for (n, p), q in
                 zip(parallel.named_parameters(), reference.parameters()) if q.grad is not None]
        missing = [n for (n, p), q in zip(parallel.named_parameters(), reference.parameters())
                   if (p.grad is None) != (q.grad is None)]
        results[name] = dict(out=(got - expected).abs().max().item(), grad=max(e for _, e in grads),
                             worst=max(grads, key=lambda x: x[1])[0], missing=missing,
                             grad_scale=max(q.grad.abs().max().item() for q in reference.parameters()
                                            if q.grad is not None))
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world, cases", [(2, CASES_2), (4, CASES_4)], ids=["world2", "world4"])
def test_context_parallel_output_and_gradients_equal_one_process(world, cases, tmp_path):
    path = tmp_path / "results.json"
    mp.spawn(_worker, args=(world, _free_port(), cases, str(path)), nprocs=world)
    results = json.loads(path.read_text())
    for name, r in results.items():
        assert r["out"] < TOL, (name, r)
        assert r["grad"] < TOL, (name, r)
        assert r["grad_scale"] > 1e-3, (name, r)  # gradients that are not all zero
        assert not r["missing"], (name, r)


@pytest.mark.parametrize("cfg, kwargs, expected", [
    (ContextParallelConfig(2, 1), dict(world_size=3), "does not divide the world size 3"),
    (ContextParallelConfig(3, 1), dict(world_size=3, num_heads=4), "ulysses_degree=3 does not divide the model's num_heads=4"),
    (ContextParallelConfig(1, 2), dict(world_size=2, attention_mode="factorized"), "needs attention_mode='full'"),
    (ContextParallelConfig(2, 2), dict(world_size=4, tokens=[64, 90]), "token counts [90] are not divisible"),
    (ContextParallelConfig(0, 1), dict(world_size=2), "ulysses_degree=0 must be an integer >= 1"),
])
def test_configs_that_cannot_work_are_named(cfg, kwargs, expected):
    problems = cfg.problems(**kwargs)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_working_config_has_no_problems():
    assert ContextParallelConfig(2, 2).problems(8, num_heads=4, tokens=[64, 320]) == []
