"""``--cuda-graphs``: when it is on, when it is refused, and (on a GPU) that replaying the captured
step trains exactly what the eager step trains, learning-rate schedule included."""

from __future__ import annotations

import contextlib
import copy
import math
import types

import pytest
import torch
from conftest import tiny_train_config

import fastcgan.train.cuda_graphs as cuda_graphs_mod
from fastcgan.ops._backends import cuda_graph_replayed
from fastcgan.train import ConfigError, build_state, build_step, resolve_fast_path, train
from fastcgan.train.cli import main as cli_main
from fastcgan.train.cuda_graphs import CUDAGraphStep, _make_capturable, cuda_graphs_blocker, use_cuda_graphs


def _cfg(**kw):
    return tiny_train_config(**{"ngf": 8, "ndf": 8, "netD": "n_layers", "n_layers_D": 2, **kw})


def _default(cfg, device, world=1):
    """What --cuda-graphs resolves to when not given (the fast-path defaults)."""
    return resolve_fast_path(cfg, device, world, free_memory=1 << 34)[0].run.cuda_graphs


CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def bf16_gpu(monkeypatch):
    """Decide as on an Ampere+ GPU (bf16) even on a CPU-only machine."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_default_is_on_on_a_gpu_when_capturable(bf16_gpu, monkeypatch):
    assert _default(_cfg(amp=True), GPU) is True  # compile is on by default on a GPU
    assert _default(_cfg(), GPU) is True  # fp32 is capturable too
    assert _default(_cfg(amp=True, compile=False), GPU) is False  # --no-compile: eager step
    assert _default(_cfg(amp=True), CPU) is False
    assert _default(_cfg(amp=True), GPU, world=2) is False
    assert _default(_cfg(amp=True, gan_mode="wgangp"), GPU) is False
    assert use_cuda_graphs(_cfg(cuda_graphs=True), GPU) is True  # fp32 eager can be captured too
    assert _default(_cfg(amp=True, cuda_graphs=False), GPU) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # fp16 + scaler
    assert _default(_cfg(amp=True), GPU) is False
    assert "fp16" in cuda_graphs_blocker(_cfg(amp=True), GPU)


@pytest.mark.parametrize(
    "cfg_kw,device,world,why",
    [
        ({}, CPU, 1, "needs a CUDA device"),
        ({}, GPU, 2, "DDP"),
        ({"gan_mode": "wgangp"}, GPU, 1, "double backward"),
    ],
)
def test_explicit_request_that_cannot_be_met_is_an_error(bf16_gpu, cfg_kw, device, world, why):
    cfg = _cfg(cuda_graphs=True, **cfg_kw)
    assert why in cuda_graphs_blocker(cfg, device, world)
    with pytest.raises(ConfigError, match=r"--cuda-graphs.*" + why):
        use_cuda_graphs(cfg, device, world)


def test_cli_refuses_cuda_graphs_on_cpu_before_writing(tmp_path, capsys):
    code = cli_main(
        ["--dataset", "synthetic", "--device", "cpu", "--cuda-graphs", "--output-dir", str(tmp_path),
         "--name", "cg", "--max-steps", "1"]  # fmt: skip
    )
    assert code == 2
    assert "--cuda-graphs" in capsys.readouterr().err
    assert not (tmp_path / "cg").exists()


def _halve_lr(opt):
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].mul_(0.5)  # what LRScheduler does to a tensor lr (fill_ in place)
        else:
            g["lr"] *= 0.5


def _copy_state(dst, src):
    """``dst`` (an eager state) := ``src``'s weights and optimizer state (deep copies: the lr
    tensors must not be shared)."""
    for name, net in src.nets.items():
        dst.nets[name].load_state_dict(net.state_dict())
    for name, opt in src.optimizers.items():
        dst.optimizers[name].load_state_dict(copy.deepcopy(opt.state_dict()))


@pytest.mark.cuda
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
def test_replayed_step_equals_eager_step(compile_):
    """Every step of CUDAGraphStep (3 warm-up steps, the capture, then replays) equals an eager
    step taken from the same state: same losses, same weights after the update, and an LR change
    after the capture reaches the replayed optimizer (the lr is a device tensor updated in place).

    The eager state is re-synchronised from the graphed one before each step: a bf16 CycleGAN is
    chaotic (a 1e-6 relative weight perturbation moves the losses by ~2e-3 one step later, 1e-2
    after a few), so two runs compared over many steps would measure that, not the replay. The
    first H200 run compared free-running states and failed at step 2 for this reason. No pool
    here, so the step draws no random numbers."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    cfg = _cfg(device="cuda", amp=True, compile=compile_, pool_size=0)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        states.append(build_state(cfg, GPU))
    eager, graphed = states
    step = build_step(graphed, cfg.replace(cuda_graphs=True))
    eager_step = build_step(eager, cfg.replace(cuda_graphs=False))
    _make_capturable(eager)  # the same Adam arithmetic (device step counter and lr) on both sides
    assert isinstance(step, CUDAGraphStep) and step.warmup == 3
    lr0 = graphed.lr()
    g = torch.Generator(device="cuda").manual_seed(1)
    for i in range(8):
        batch = {d: torch.rand(1, 3, 32, 32, device="cuda", generator=g) * 2 - 1 for d in "AB"}
        if i == 5:  # an epoch boundary after the capture: the schedule changes the lr
            _halve_lr(graphed.optimizers["G"])
            _halve_lr(graphed.optimizers["D"])
        _copy_state(eager, graphed)
        with cuda_graph_replayed():  # the kernels "auto" picks for a replayed step, on both sides
            out_e = {k: v.clone() for k, v in eager_step(batch).items()}
        out_g = {k: v.clone() for k, v in step(batch).items()}
        for k in out_e:
            torch.testing.assert_close(out_g[k], out_e[k], rtol=2e-3, atol=2e-3,
                                       msg=lambda m, i=i, k=k: f"step {i} loss {k}: {m}")
        for net in ("G_AB", "D_A"):  # one Adam step moves a weight by ~lr = 2e-4: judge at 5 % of it
            for (n, p), q in zip(eager.nets[net].named_parameters(), graphed.nets[net].parameters()):
                torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=lambda m, i=i, n=n: f"step {i} {n}: {m}")
    assert step.graph is not None
    assert graphed.lr() == pytest.approx(lr0 / 2)


@pytest.mark.cuda
def test_captured_step_with_pool_trains():
    """With the image pool (device RNG inside the graph) the captured step runs and learns."""
    cfg = _cfg(device="cuda", amp=True, pool_size=4)
    torch.manual_seed(0)
    st = build_state(cfg, GPU)
    step = build_step(st, cfg.replace(cuda_graphs=True))
    g = torch.Generator(device="cuda").manual_seed(1)
    batch = {d: torch.rand(1, 3, 32, 32, device="cuda", generator=g) * 2 - 1 for d in "AB"}
    first = {k: v.clone() for k, v in step(batch).items()}
    for _ in range(30):
        out = step(batch)
    assert step.graph is not None
    assert all(torch.isfinite(v).item() for v in out.values())
    assert out["cycle_A"].item() < first["cycle_A"].item()


def test_warmup_reuses_one_side_stream_and_capture_is_thread_local(monkeypatch):
    """Runs on a CPU: CUDAGraphStep driven through its warm-up, capture and replays with
    torch.cuda's stream and graph API recorded. One side stream for the step object (a stream per
    warm-up step stranded each step's cached blocks on a stream never used again), on the training
    device; the capture runs on it in "thread_local" mode (the default "global" mode is
    invalidated by the DataLoader pin-memory thread's cudaHostAlloc / cudaEventQuery)."""
    made, captures, waited = [], [], []

    class Stream:
        def __init__(self, device=None):
            made.append(device)

        def wait_stream(self, other):
            waited.append(other)

    current = types.SimpleNamespace(wait_stream=lambda s: waited.append(s))
    replays = []
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: replays.append(1)))

    def graph(g, *args, **kwargs):
        captures.append((args, kwargs))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(cuda_graphs_mod, "train_step", lambda exe, batch, recipe, cfg: {"loss": batch["A"].sum()})
    exe = types.SimpleNamespace(
        device=torch.device("cuda", 1), state=types.SimpleNamespace(optimizers={}), autocast_cache=True
    )
    step = CUDAGraphStep(exe, None, None, warmup=3)
    for _ in range(6):
        step({"A": torch.ones(2), "B": torch.ones(2)})
    assert made == [torch.device("cuda", 1)], made  # one stream, made once, on the training device
    assert len(captures) == 1 and len(replays) == 3
    args, kwargs = captures[0]
    assert not args and kwargs == {"stream": step.side, "capture_error_mode": "thread_local"}


@pytest.mark.cuda
def test_training_with_cuda_graphs_and_loader_workers(tmp_path):
    """The captured step fed by the DataLoader (data_on_gpu off, 2 workers, pinned memory): its
    pin-memory thread calls cudaHostAlloc / cudaEventQuery while the step is being captured, which
    invalidates a capture in the default "global" mode (the capture is "thread_local")."""
    cfg = _cfg(device="cuda", amp=True, compile=False, cuda_graphs=True, data_on_gpu=False, num_workers=2,
               max_steps=12, synthetic_train=16, output_dir=str(tmp_path))
    s = train(cfg)
    assert s["step"] == 12 and s["exit_code"] == 0
    assert all(math.isfinite(v) for v in s["final_losses"].values()), s["final_losses"]
