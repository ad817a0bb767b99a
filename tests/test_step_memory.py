"""The step-memory floor (fastcgan.train.memory): below what a real step keeps, for every recipe,
and a run whose floor exceeds the memory there is refused before anything is written."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from conftest import tiny_train_config
from torch import nn

from fastcgan.data import ensure_synthetic_dataset
from fastcgan.devices import format_bytes
from fastcgan.recipes import get_recipe
from fastcgan.train import TrainConfig, build_state, build_step
from fastcgan.train.cli import main as cli_main
from fastcgan.train.config import ConfigError
from fastcgan.train.memory import _batch_channels, check_step_fits, kept_activations, step_memory_floor

# (preset, side, overrides): every recipe and generator family at the smallest size it trains at.
CASES = [
    ("cyclegan128", 32, {}),
    ("cyclegan", 36, {"norm": "batch", "antialias": True, "antialias_up": True}),
    ("discogan", 128, {"netD": "pixel"}),
    ("udacity", 64, {}),
    ("pix2pix", 256, {"netD": "n_layers", "n_layers_D": 2}),
    ("colorization", 256, {}),
    # CUT's PatchNCE logits and heads (not counted: no convolutions) outweigh a 4-channel generator at 32²
    ("cut", 64, {"ngf": 16, "num_patches": 32, "netF_nc": 32}),
    ("fastcut", 64, {"ngf": 16, "num_patches": 32, "netF_nc": 32}),
]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("synth") / "s32"), size=32, n_train=4, n_test=2)


def _cfg(preset, side, overrides, **more):
    return tiny_train_config(preset=preset, load_size=side, crop_size=side, **(overrides | more))


def _real_kept(cfg, recipe, inputs) -> int:
    """Bytes of the tensors one real CPU step saves for its backward in its busiest phase (each
    storage once, the networks' own weights left out), counted as the floor counts: a
    forward-only phase's tensors stay until the last backward."""
    state = build_state(cfg)
    weights = {p.untyped_storage().data_ptr() for net in state.nets.values() for p in net.parameters()}
    per_phase: dict[str, dict[int, int]] = {}

    def counted(phase):
        def forward(run, batch, carry, cfg_):
            seen = per_phase.setdefault(phase.name, {})

            def pack(t):
                s = t.untyped_storage()
                if s.data_ptr() not in weights:
                    seen[s.data_ptr()] = s.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return phase.forward(run, batch, carry, cfg_)

        return dataclasses.replace(phase, forward=forward)

    spy = dataclasses.replace(recipe, phases=tuple(counted(ph) for ph in recipe.phases))
    build_step(state, cfg, spy)(inputs)
    held, peak = 0, 0
    for phase in recipe.phases:
        kept = sum(per_phase[phase.name].values())
        if phase.optimizer is None:
            held += kept
        else:
            peak = max(peak, held + kept)
    return peak


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("preset,side,overrides", CASES, ids=[c[0] for c in CASES])
def test_the_floor_is_below_what_a_real_step_keeps(preset, side, overrides, kernels, one_thread):
    """Every recipe, batch 2, fp32: the CPU's fused kernels (auto) and the reference ones; the
    floor must never exceed what the step really keeps (it refuses runs), and must not be far
    below it either (it would refuse nothing): measured 0.25-0.53 of the real tensors at these sizes."""
    cfg = _cfg(preset, side, overrides, kernels=kernels, batch_size=2)
    recipe = get_recipe(cfg.model.recipe)
    torch.manual_seed(0)
    uint8 = {k: torch.randint(0, 256, (2, c, side, side), dtype=torch.uint8)
             for k, c in _batch_channels(cfg, recipe).items()}
    inputs = recipe.augment_batch(uint8, crop_size=None, flip=False)
    with torch.device("meta"):
        nets = recipe.networks(cfg)
    floor = kept_activations(cfg, recipe, nets, (side, side), 2)
    real = _real_kept(cfg, recipe, inputs)
    assert 0.2 * real < floor <= real, (floor, real)


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
@pytest.mark.parametrize("preset, side, overrides", CASES, ids=[c[0] for c in CASES])
def test_every_recipe_and_direction_is_counted(preset, side, overrides, direction):
    """check_step_fits takes a count that raises for "no estimate" (a run is never blocked by the
    check's own failure), which hid a reversed run's channel mix-up: every recipe, both directions,
    1- and 3-channel inputs where the recipe takes them, must count without raising."""
    counted = 0
    for nc in ({}, {"input_nc": 1, "output_nc": 3, "lambda_identity": 0.0, "lambda_nce": 0.0}):
        try:
            cfg = _cfg(preset, side, overrides, direction=direction, **({} if preset == "colorization" else nc))
        except ConfigError:  # a recipe that does not take these channels
            continue
        assert step_memory_floor(cfg, get_recipe(cfg.model.recipe), (side, side), 1) > 0
        counted += 1
    assert counted or (preset, direction) == ("colorization", "BtoA")  # L -> ab only: BtoA is refused


def test_the_floor_counts_the_dtype_batch_pools_and_optimizer_state():
    cfg = _cfg("cyclegan128", 32, {})
    recipe = get_recipe("cyclegan")
    one = step_memory_floor(cfg, recipe, (32, 32), 1)
    # Two images keep twice the activations; weights, gradients, Adam's moments and the pools do not grow.
    with torch.device("meta"):
        nets = recipe.networks(cfg)
    act1 = kept_activations(cfg, recipe, nets, (32, 32), 1)
    assert step_memory_floor(cfg, recipe, (32, 32), 2) - one == act1
    assert kept_activations(cfg.replace(amp=True), recipe, nets, (32, 32), 1) * 2 == act1
    weights = sum(p.numel() for net in nets.values() for p in net.parameters()) * 4
    pools = 2 * 50 * 3 * 32 * 32 * 4  # pool_A and pool_B: 50 fp32 images each
    assert one == act1 + 4 * weights + pools
    assert step_memory_floor(cfg.replace(pool_size=0), recipe, (32, 32), 1) == one - pools
    # A non-square size is (height, width); the activations follow its area.
    assert kept_activations(cfg, recipe, nets, (32, 64), 1) == 2 * act1


def test_a_step_that_cannot_fit_names_sizes_and_flags():
    cfg = _cfg("cyclegan128", 32, {}, batch_size=4)
    recipe = get_recipe("cyclegan")
    floor = step_memory_floor(cfg, recipe, (32, 32), 4)
    # Exactly enough: runs, with a warning until twice the floor fits (a real CPU step held 2x its floor).
    assert "it may run out of memory" in check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32), room=floor)
    assert check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32), room=2 * floor) is None
    with pytest.raises(ConfigError, match=r"^training 4 image\(s\) of 32x32 \(WxH\) per step with --model cyclegan "
                       r"needs at least [\d.]+ MiB \(activations .*\) and this process may allocate [\d.]+ MiB; "
                       r"make it smaller: --batch-size, --crop-size / --load-size, --amp; FASTCGAN_MEMORY_CHECK=0 "
                       r"runs it anyway$"):
        check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32), room=floor - 1)
    # Two processes: each takes half the global batch; the decoded-image bank counts on the same device.
    check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32), world_size=2,
                    room=step_memory_floor(cfg, recipe, (32, 32), 2))
    bank = r"besides the 1\.0 GiB of decoded images \(--data-on-gpu\).*--no-data-on-gpu"
    with pytest.raises(ConfigError, match=bank):
        check_step_fits(cfg.replace(data_on_gpu=True), recipe, torch.device("cpu"), (32, 32), bank_bytes=1 << 30,
                        room=floor + (1 << 29))
    with pytest.raises(ConfigError, match=r"24x32 \(WxH\) per step.*\(--preprocess none trains at the "
                       r"images' own size\); "):
        check_step_fits(cfg.replace(preprocess="none"), recipe, torch.device("cpu"), (32, 24), room=1)


def test_processes_of_a_node_share_the_host_memory(monkeypatch):
    """On a CPU the room is what the process may allocate, shared by the node's torchrun processes."""
    import fastcgan.devices as devices

    cfg = _cfg("cyclegan128", 32, {})
    recipe = get_recipe("cyclegan")
    floor = step_memory_floor(cfg, recipe, (32, 32), 1)
    monkeypatch.setattr(devices, "host_available_bytes", lambda: 2 * floor)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="needs at least"):
        check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32))
    monkeypatch.setattr(devices, "host_available_bytes", lambda: None)  # nothing tells: nothing refused
    check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32))


def test_an_explicit_kernel_backend_trains(tmp_path, synth):
    """The floor is counted with the reference kernels: --kernels cpp (a backend that runs on CPU
    tensors, not meta ones) made every run a traceback before it started."""
    args = ["--dataroot", synth, "--output-dir", str(tmp_path), "--load-size", "32", "--crop-size", "32", "--ngf", "4",
            "--ndf", "4", "--device", "cpu", "--max-steps", "1", "--no-progress", "--no-tensorboard",
            "--eval-every", "0", "--kernels", "cpp"]
    assert cli_main(args) == 0


def test_training_that_cannot_fit_exits_2_before_anything_is_written(tmp_path, synth, monkeypatch, capsys):
    """`--crop-size 1024 --batch-size 4` on a 24 GB CPU: Linux's OOM killer ended the run minutes
    later without a word (measured: killed at 23.4 GB). The floor refuses it at once, exit 2,
    and neither the run directory nor anything in it is created."""
    import fastcgan.devices as devices

    monkeypatch.setattr(devices, "host_available_bytes", lambda: 64 << 20)  # 64 MiB
    out = tmp_path / "runs"
    args = ["--dataroot", synth, "--output-dir", str(out), "--name", "big", "--load-size", "64", "--crop-size", "64",
            "--batch-size", "2", "--device", "cpu", "--max-steps", "1", "--no-progress", "--no-tensorboard",
            "--eval-every", "0"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert ("fastcgan-train: error: training 2 image(s) of 64x64 (WxH) per step with --model cyclegan needs at "
            "least") in err
    assert "this process may allocate 64.0 MiB" in err and "Traceback" not in err
    assert not out.exists()
    assert os.listdir(tmp_path) == []
    assert "; FASTCGAN_MEMORY_CHECK=0 runs it anyway" in err
    monkeypatch.setenv("FASTCGAN_MEMORY_CHECK", "0")  # the user's word: the step runs (it fits, really)
    assert cli_main(args) == 0


def test_a_recipe_says_what_its_dataset_does():
    """The floor reads the batch's channels from the recipe (before any dataset exists); the
    datasets say the same of themselves."""
    from fastcgan.data import AlignedDataset, ColorizationDataset

    assert get_recipe("colorization").target_from_input is ColorizationDataset.target_from_input is True
    assert get_recipe("pix2pix").target_from_input is AlignedDataset.target_from_input is False
    assert not any(get_recipe(r).target_from_input for r in ("cyclegan", "cut"))


def test_a_synthetic_run_that_cannot_fit_makes_no_data(tmp_path, monkeypatch, capsys):
    """--dataset synthetic made its images first (at 2048 px, minutes and gigabytes of files) and was
    refused only then: their size is known from the flags, so the step is judged before."""
    import fastcgan.devices as devices

    monkeypatch.setattr(devices, "host_available_bytes", lambda: 64 << 20)
    args = ["--dataset", "synthetic", "--output-dir", str(tmp_path), "--name", "big", "--load-size", "72",
            "--crop-size", "64", "--batch-size", "8", "--device", "cpu", "--max-steps", "1", "--no-progress"]
    assert cli_main(args) == 2
    assert "training 8 image(s) of 64x64 (WxH) per step" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("room_over_floor", [1.5, 2.5])
def test_a_step_that_may_not_fit_is_said_at_the_start(tmp_path, synth, monkeypatch, capsys, room_over_floor):
    """A floor that fits with less than twice its room left (a real CPU step held 2x its floor) runs,
    with one warning line naming the sizes and the flags that shrink a run: on a CPU such a run
    is otherwise ended by Linux's OOM killer, without a message."""
    import fastcgan.devices as devices
    from fastcgan.train.cli import parse_config

    args = ["--dataroot", synth, "--output-dir", str(tmp_path), "--load-size", "32", "--crop-size", "32",
            "--ngf", "4", "--ndf", "4", "--device", "cpu", "--max-steps", "1", "--no-progress", "--no-tensorboard",
            "--eval-every", "0", "--batch-size", "2"]
    floor = step_memory_floor(parse_config(args)[0], get_recipe("cyclegan"), (32, 32), 2)
    monkeypatch.setattr(devices, "host_available_bytes", lambda: int(room_over_floor * floor))
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "may run out of memory" in line]
    if room_over_floor < 2:
        assert warned == [f"fastcgan: warning: training 2 image(s) of 32x32 (WxH) per step with --model cyclegan "
                          f"needs at least {format_bytes(floor)}, a real step more (a CPU step measured: 2x), and "
                          f"this process may allocate {format_bytes(int(1.5 * floor))}: it may run out of memory (on "
                          f"a CPU Linux then ends the process without a message); smaller: --batch-size, "
                          f"--crop-size / --load-size, --amp"]
    else:
        assert warned == []


@pytest.mark.cuda
def test_free_memory_counts_the_caching_allocators_unused_blocks():
    """PyTorch keeps freed CUDA blocks reserved: the driver's free memory alone would refuse
    work that those blocks can hold."""
    from fastcgan.devices import free_memory

    gpu = torch.device("cuda")
    x = torch.empty(256 << 20, dtype=torch.uint8, device=gpu)
    del x
    unused = torch.cuda.memory_reserved(gpu) - torch.cuda.memory_allocated(gpu)
    assert unused >= 256 << 20
    assert free_memory(gpu) >= torch.cuda.mem_get_info(gpu)[0] + (256 << 20)


@pytest.mark.cuda
@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_the_floor_is_below_a_real_gpu_step(kernels):
    """On the GPU, bf16 autocast, channels_last, the fused kernels: the floor of the activations
    stays below what one eager step allocates beyond the state it starts from (which also holds
    cuDNN's workspaces and autocast's weight copies: only a loose lower check)."""
    cfg = TrainConfig.from_preset("cyclegan", dataset="synthetic", device="cuda", amp=True, ngf=32, ndf=32,
                                  load_size=128, crop_size=128, batch_size=2, kernels=kernels,
                                  channels_last=True)
    recipe = get_recipe("cyclegan")
    torch.manual_seed(0)
    state = build_state(cfg)
    step = build_step(state, cfg)
    batch = {k: torch.rand(2, 3, 128, 128, device="cuda") * 2 - 1 for k in ("A", "B")}
    step(batch)  # Adam's moments and the pools exist from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(batch)
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - base
    with torch.device("meta"):
        nets = recipe.networks(cfg)
    floor = kept_activations(cfg, recipe, nets, (128, 128), 2)
    assert 0.05 * used < floor <= used, (floor, used)


def test_an_auto_data_bank_gives_its_room_to_the_step(tmp_path, synth, monkeypatch, capsys):
    """--data-on-gpu auto takes up to a quarter of the free memory; when the step's floor needs
    that room the bank stays off (the loader reads the files) instead of the run being refused.
    (Auto is off on a CPU: resolve_fast_path is made to turn it on here, as on a GPU.)"""
    import fastcgan.devices as devices
    import fastcgan.train.loop as loop

    real = loop.resolve_fast_path

    def gpu_like(cfg, device, world_size=1, dataset_nbytes=None, *a, **k):
        cfg, line = real(cfg, device, world_size, dataset_nbytes, *a, **k)
        return (cfg.replace(data_on_gpu=True), line + ", data on the GPU") if dataset_nbytes else (cfg, line)

    monkeypatch.setattr(loop, "resolve_fast_path", gpu_like)
    args = ["--dataroot", synth, "--output-dir", str(tmp_path), "--name", "auto", "--load-size", "32", "--crop-size",
            "32", "--ngf", "4", "--ndf", "4", "--device", "cpu", "--max-steps", "1", "--no-progress",
            "--no-tensorboard", "--eval-every", "0"]
    from fastcgan.train.cli import parse_config

    floor = step_memory_floor(parse_config(args)[0], get_recipe("cyclegan"), (32, 32), 1)
    bank = (4 + 4) * 3 * 32 * 32  # the synthetic set: 4 + 4 training images, uint8
    monkeypatch.setattr(devices, "host_available_bytes", lambda: floor + bank // 2)
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert "; the images stay off the GPU (the step needs the memory)" in err
    assert "data on the GPU" not in err
    # An explicit request is the user's: refused, naming both sizes.
    assert cli_main([*args, "--name", "explicit", "--data-on-gpu"]) == 2
    assert "besides the 24.0 KiB of decoded images (--data-on-gpu)" in capsys.readouterr().err


def test_processes_keep_an_auto_bank_only_if_every_one_can():
    """The bank and the loader draw different batches: under DDP a process whose free memory
    turned auto's bank off (or whose step needs the room) turns it off everywhere; a process whose
    step cannot fit at all refuses the run on every process (each gets the same clean error)."""
    import fastcgan.train.loop as loop

    class Ranks:  # this process, then the others' (bank on, refusal with the bank, refusal without,
        def __init__(self, *others):  # warning with the bank, warning without)
            self.others, self.world_size = others, 1 + len(others)

        def gather_objects(self, obj):
            return [obj, *self.others]

    cfg = _cfg("cyclegan128", 32, {}, data_on_gpu=True)
    fits = lambda cfg, bank_bytes=0: None  # noqa: E731 - the step fits here with or without the bank
    cpu = torch.device("cpu")
    kept, lines = loop._fit_step_and_bank(cfg, "line", fits, 1000, True, Ranks((True, None, None, None, None)), cpu)
    assert kept.data.data_on_gpu and lines == ["line"]
    for other in [(False, None, None, None, None), (True, "no room for the bank there", None, None, None)]:
        off, lines = loop._fit_step_and_bank(cfg, "line", fits, 1000, True, Ranks(other), cpu)
        assert off.data.data_on_gpu is False
        assert len(lines) == 1 and lines[0].endswith("; the images stay off the GPU (another process has no room "
                                                     "for them)")
    # Asked for explicitly: refused everywhere when any process cannot hold it.
    with pytest.raises(ConfigError, match="^no room for the bank there$"):
        loop._fit_step_and_bank(cfg, "line", fits, 1000, False,
                                Ranks((True, "no room for the bank there", None, None, None)), cpu)
    # A step that does not fit on another process: this one refuses too, with that process's words.
    with pytest.raises(ConfigError, match="^the step needs 9 GiB there$"):
        loop._fit_step_and_bank(cfg, "line", fits, 1000, True,
                                Ranks((True, None, "the step needs 9 GiB there", None, None)), cpu)
    # Process 0 says every process's warning (only it prints), each once, as the bank ends up.
    tight = "fastcgan: warning: training 1 image(s) ... may run out of memory"
    _, lines = loop._fit_step_and_bank(cfg, "line", fits, 1000, True,
                                       Ranks((True, None, None, "with the bank", tight), (False, None, None, None, tight),
                                             (True, None, None, None, tight)), cpu)
    assert lines[1:] == ["fastcgan: warning: process 1: training 1 image(s) ... may run out of memory"]


def test_kept_activations_counts_a_shared_input_once_and_no_grad_forwards_not_at_all():
    """Catches: memory.py `seen.append(x)` removed (a tensor fed to two networks counted twice) and
    the `torch.is_grad_enabled()` test dropped (a no_grad forward, e.g. CUT's keys, counted)."""
    from fastcgan.recipes.base import Phase
    from fastcgan.train.memory import kept_activations

    def forward(run, batch, carry, cfg):
        a = batch["A"]
        loss = run.net("N1")(a).sum() + run.net("N2")(a).sum()  # one input, two networks: kept once
        with torch.no_grad():
            run.net("N1")(batch["B"])  # no graph: nothing kept
        return loss, {}, carry

    toy = dataclasses.replace(get_recipe("cyclegan"), phases=(Phase("P", "G", forward),),
                              optimizers={"G": ("N1", "N2")})
    with torch.device("meta"):
        nets = {"N1": nn.Conv2d(3, 5, 1), "N2": nn.Conv2d(3, 7, 1)}
    assert kept_activations(tiny_train_config(), toy, nets, (8, 8), 2) == 2 * 3 * 8 * 8 * 4  # A, fp32, once


def test_the_floor_is_counted_with_an_explicit_kernel_backend():
    """Catches: `recipe.networks(cfg.replace(kernels="torch"))` -> `recipe.networks(cfg)`. The cpp
    backend cannot run on meta tensors; check_step_fits swallows the exception, so the memory
    check was silently OFF for --kernels cpp (test_an_explicit_kernel_backend_trains still passes)."""
    from fastcgan.ops import available_backends
    from fastcgan.train.memory import check_step_fits, step_memory_floor

    if not available_backends()["cpp"].available:
        pytest.skip("no native library")
    cfg = tiny_train_config(kernels="cpp")
    recipe = get_recipe("cyclegan")
    assert step_memory_floor(cfg, recipe, (32, 32), 1) == step_memory_floor(cfg.replace(kernels="torch"), recipe,
                                                                            (32, 32), 1)
    with pytest.raises(ConfigError, match="needs at least"):
        check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32), room=1)


def test_the_pools_follow_a_non_square_size():
    """Catches: the pools counted as size[0] * size[0] (any swap of height/width in the pool term)."""
    from fastcgan.train.memory import step_memory_floor

    cfg = tiny_train_config()
    recipe = get_recipe("cyclegan")
    pools = step_memory_floor(cfg, recipe, (32, 64), 1) - step_memory_floor(cfg.replace(pool_size=0), recipe,
                                                                            (32, 64), 1)
    assert pools == 2 * 50 * 3 * 32 * 64 * 4


def test_a_gpu_is_not_shared_by_the_nodes_processes(monkeypatch):
    """Catches: the LOCAL_WORLD_SIZE split applied to CUDA too (each torchrun process has its own GPU;
    only host memory is shared). No GPU needed: the floor is counted on meta."""
    import fastcgan.train.memory as memory

    cfg = tiny_train_config()
    recipe = get_recipe("cyclegan")
    floor = memory.step_memory_floor(cfg, recipe, (32, 32), 1)
    monkeypatch.setattr(memory, "memory_to_check", lambda device: floor)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    memory.check_step_fits(cfg, recipe, torch.device("cuda"), (32, 32))  # fits: no ConfigError
    with pytest.raises(ConfigError, match=r"and cuda has [\d.]+ MiB free"):
        memory.check_step_fits(cfg.replace(batch_size=2), recipe, torch.device("cuda"), (32, 32))


def test_smaller_run_flags_follow_the_config():
    """Catches: "--amp" offered to a run that already uses --amp (and its sibling conditions)."""
    from fastcgan.train.memory import smaller_run_flags

    cfg = tiny_train_config()
    assert smaller_run_flags(cfg) == ["--crop-size / --load-size", "--amp"]
    assert smaller_run_flags(cfg.replace(amp=True, batch_size=2, data_on_gpu=True)) == [
        "--batch-size", "--crop-size / --load-size", "--no-data-on-gpu"]


def test_a_reversed_run_is_counted_with_its_input_channels():
    """--direction BtoA (one-way recipes): the dataset already puts {phase}B in the batch's "A" with
    input_nc channels; the count swapped them again, its meta forward raised, and check_step_fits
    took that for "no estimate": a reversed CUT run with 1-channel inputs was never checked."""
    from fastcgan.train.memory import check_step_fits, step_memory_floor

    cfg = tiny_train_config(preset="cut", direction="BtoA", input_nc=1, output_nc=3, lambda_nce=0.0)
    recipe = get_recipe("cut")
    assert step_memory_floor(cfg, recipe, (32, 32), 1) > 0  # was: RuntimeError "Invalid channel dimensions"
    with pytest.raises(ConfigError, match="needs at least"):  # was: nothing refused (the run trained)
        check_step_fits(cfg, recipe, torch.device("cpu"), (32, 32), room=1)


def test_the_may_not_fit_warning_counts_the_data_bank_once_and_zero_room_refuses():
    """Catches (mutation testing): the warning's threshold with the bank left out or doubled (the
    bank is held once, beside a step of twice the floor), and zero room -- a cgroup at its limit --
    turning the check off instead of refusing."""
    cfg = _cfg("cyclegan128", 32, {}, batch_size=4).replace(data_on_gpu=True)
    recipe, cpu, bank = get_recipe(cfg.model.recipe), torch.device("cpu"), 1 << 20
    floor = step_memory_floor(cfg, recipe, (32, 32), 4)
    assert check_step_fits(cfg, recipe, cpu, (32, 32), bank_bytes=bank, room=2 * floor + bank) is None
    warning = check_step_fits(cfg, recipe, cpu, (32, 32), bank_bytes=bank, room=2 * floor + bank - 1)
    assert warning and "it may run out of memory" in warning
    with pytest.raises(ConfigError, match="this process may allocate 0 B"):
        check_step_fits(cfg, recipe, cpu, (32, 32), room=0)


def test_a_malformed_local_world_size_keeps_the_check(monkeypatch):
    """Catches: LOCAL_WORLD_SIZE=x (not torchrun's) turning the host-memory check off."""
    import fastcgan.train.memory as memory

    monkeypatch.setattr(memory, "memory_to_check", lambda device: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    cfg = _cfg("cyclegan128", 32, {})
    with pytest.raises(ConfigError, match="this process may allocate 1 B"):
        check_step_fits(cfg, get_recipe(cfg.model.recipe), torch.device("cpu"), (32, 32))


def test_the_synthetic_precheck_uses_the_trained_size_and_each_processs_share(tmp_path, monkeypatch, capsys):
    """Catches: a synthetic run with --preprocess none judged at --crop-size (it trains at
    --load-size), and the check before its data is made judged on the global batch under torchrun
    (world_size 1: runs that fit refused)."""
    import types

    import fastcgan.train.loop as loop

    assert loop._synthetic_step_size(tiny_train_config(preprocess="none", load_size=64, crop_size=32)) == (64, 64)
    assert loop._synthetic_step_size(tiny_train_config(load_size=64, crop_size=32)) == (32, 32)
    seen = []

    def spy(cfg, **kw):
        seen.append(kw)
        raise ConfigError("stop here")

    ctx = types.SimpleNamespace(world_size=2, rank=0, is_main=True, enabled=True, gather_objects=lambda o: [o, o],
                                barrier=lambda: None, shutdown=lambda: None)
    monkeypatch.setattr(loop, "from_environment", lambda device: (ctx, torch.device("cpu")))
    monkeypatch.setattr(loop, "check_step_fits", spy)
    args = ["--dataset", "synthetic", "--output-dir", str(tmp_path), "--name", "s", "--load-size", "32",
            "--crop-size", "24", "--batch-size", "2", "--device", "cpu", "--max-steps", "1", "--no-progress"]
    assert cli_main(args) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen and seen[0]["world_size"] == 2 and seen[0]["size"] == (24, 24)
