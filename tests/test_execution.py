"""How the step runs: fast by default on a GPU (mocked here), measured defaults on the CPU,
--faithful, the --no-* switches, and that TrainState holds only what a checkpoint holds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_train_config

from fastcgan.train import ConfigError, TrainState, build_state, build_step, resolve_fast_path
from fastcgan.train.checkpoint import capture
from fastcgan.train.cli import parse_config
from fastcgan.train.execution import DATA_ON_GPU_SHARE

GPU, CPU = torch.device("cuda", 0), torch.device("cpu")
GiB = 1 << 30


@pytest.fixture
def bf16_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_amp_alone_turns_on_the_fast_path_on_a_gpu(bf16_gpu, capsys):
    """`python -m fastcgan.train --amp` and no other flag, on a (mocked) 80 GB GPU."""
    cfg, requested = parse_config(["--dataset", "synthetic", "--amp"])
    assert requested == {"dataset": "synthetic", "amp": True}
    r, line = resolve_fast_path(cfg, GPU, dataset_nbytes=2 * GiB, free_memory=79 * GiB)
    assert (r.run.compile, r.run.channels_last, r.run.cuda_graphs, r.data.data_on_gpu) == (True,) * 4
    assert r.run.amp and r.run.kernels == "auto"
    assert r.run.cudnn_benchmark is True
    for said in ("bf16 autocast", "torch.compile", "channels_last", "CUDA graphs", "data on the GPU", "cuDNN autotuning"):
        assert said in line, line
    for off in ("--no-compile", "--no-channels-last", "--no-cuda-graphs", "--no-data-on-gpu", "--no-cudnn-benchmark",
                "--faithful"):  # fmt: skip
        assert off in line, line


def test_the_start_line_names_the_phases_left_eager():
    """WGAN-GP's discriminator phase (a double backward) is not compiled: the line said
    torch.compile as for a fully compiled step."""
    _, line = resolve_fast_path(tiny_train_config(compile=True, gan_mode="wgangp"), CPU, dataset_nbytes=1)
    assert "torch.compile (discriminator phase eager)" in line, line
    _, line = resolve_fast_path(tiny_train_config(compile=True), CPU, dataset_nbytes=1)
    assert "torch.compile," in line and "eager)" not in line, line


def test_data_on_gpu_on_a_cpu_says_where_the_data_is():
    """--data-on-gpu on a CPU keeps the decoded set in host memory; the line said 'on the GPU'."""
    _, line = resolve_fast_path(tiny_train_config(data_on_gpu=True), CPU, dataset_nbytes=1)
    assert "data decoded once in memory" in line and "GPU" not in line.split("(")[0], line


@pytest.mark.parametrize(
    "preprocess, flag, on_gpu",
    [
        ("resize_and_crop", None, True),  # one shape per batch: tune once
        ("scale_width_and_crop", None, True),
        ("crop", None, True),
        ("scale_width", None, False),  # a shape per image size: tuning again at each one
        ("none", None, False),
        ("none", True, True),  # explicit wins
        ("resize_and_crop", False, False),
    ],
)
def test_cudnn_autotuning_when_batches_have_one_shape(bf16_gpu, preprocess, flag, on_gpu):
    """The official BaseModel sets cudnn.benchmark unless scale_width; the trainer did not set it
    at all, while every GPU bench row ran with it (so the bench measured a faster trainer than
    users ran)."""
    cfg = tiny_train_config(preprocess=preprocess, cudnn_benchmark=flag)
    assert resolve_fast_path(cfg, GPU, dataset_nbytes=1, free_memory=79 * GiB)[0].run.cudnn_benchmark is on_gpu
    assert resolve_fast_path(cfg, CPU, dataset_nbytes=1)[0].run.cudnn_benchmark is False  # nothing to tune
    faithful = tiny_train_config(preprocess=preprocess, cudnn_benchmark=flag, faithful=True)
    assert resolve_fast_path(faithful, GPU, free_memory=79 * GiB)[0].run.cudnn_benchmark is on_gpu


def test_cudnn_autotuning_is_set_for_the_run_and_restored(bf16_gpu):
    from fastcgan.train.execution import cudnn_autotuning

    before = torch.backends.cudnn.benchmark
    try:
        for start, want in ((False, True), (True, False)):
            torch.backends.cudnn.benchmark = start
            cfg = resolve_fast_path(tiny_train_config(cudnn_benchmark=want), GPU, free_memory=79 * GiB)[0]
            with cudnn_autotuning(cfg, GPU):
                assert torch.backends.cudnn.benchmark is want
            assert torch.backends.cudnn.benchmark is start
            with cudnn_autotuning(cfg, CPU):  # a CPU run leaves the process switch alone
                assert torch.backends.cudnn.benchmark is start
    finally:
        torch.backends.cudnn.benchmark = before


def test_data_bank_only_when_it_fits(bf16_gpu):
    cfg = tiny_train_config(amp=True)
    free = 10 * GiB
    fits = int(DATA_ON_GPU_SHARE * free)
    assert resolve_fast_path(cfg, GPU, dataset_nbytes=fits, free_memory=free)[0].data.data_on_gpu is True
    assert resolve_fast_path(cfg, GPU, dataset_nbytes=fits + 1, free_memory=free)[0].data.data_on_gpu is False
    assert resolve_fast_path(cfg, GPU, dataset_nbytes=None, free_memory=free)[0].data.data_on_gpu is False
    # The images go straight to the GPU, one at a time: the host's memory does not count there.
    assert resolve_fast_path(cfg, GPU, dataset_nbytes=fits, free_memory=free, host_memory=1)[0].data.data_on_gpu


def test_an_explicit_data_bank_that_cannot_be_held_is_a_config_error(bf16_gpu, monkeypatch):
    """--data-on-gpu decodes the whole training set; given explicitly it was taken as given, and a
    set larger than the GPU (on a CPU: the memory there is) ran until an OOM ended it."""
    cfg = tiny_train_config(amp=True, data_on_gpu=True)
    with pytest.raises(ConfigError, match=r"^data_on_gpu \(--data-on-gpu\): the decoded training set is 40\.0 GiB "
                                          r".* cuda:0 has 30\.0 GiB free; use --no-data-on-gpu"):
        resolve_fast_path(cfg, GPU, dataset_nbytes=40 * GiB, free_memory=30 * GiB, host_memory=100 * GiB)
    on_cpu = r"\(--data-on-gpu \(on a CPU: decoded once into memory\)\): the decoded training set is 10\.0 GiB"
    with pytest.raises(ConfigError, match=on_cpu + r" .* this process may allocate 8\.0 GiB \(at most 4/5 of it"):
        resolve_fast_path(cfg, CPU, dataset_nbytes=10 * GiB, host_memory=8 * GiB)
    with pytest.raises(ConfigError, match=on_cpu.replace("10", "7")):  # a fifth stays for the networks
        resolve_fast_path(cfg, CPU, dataset_nbytes=7 * GiB, host_memory=8 * GiB)
    assert resolve_fast_path(cfg, CPU, dataset_nbytes=6 * GiB, host_memory=8 * GiB)[0].data.data_on_gpu
    # Explicit asks less than auto: all of the free memory (auto: a quarter of it).
    r, _ = resolve_fast_path(cfg, GPU, dataset_nbytes=29 * GiB, free_memory=30 * GiB, host_memory=1)
    assert r.data.data_on_gpu is True
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun on a CPU: each process of the node holds its bank
    with pytest.raises(ConfigError, match=r"29\.0 GiB \(at most 4/5 of it for the images\) for 4 processes that"):
        resolve_fast_path(cfg, CPU, dataset_nbytes=6 * GiB, host_memory=29 * GiB)
    assert resolve_fast_path(cfg, GPU, dataset_nbytes=8 * GiB, free_memory=30 * GiB)[0].data.data_on_gpu


def test_an_explicit_data_bank_too_big_for_this_machine_stops_before_decoding(tmp_path, monkeypatch):
    """End to end on the CPU: the check reads the headers (--preprocess crop keeps each image's
    size) and refuses before any image is decoded or the run directory is written."""
    import fastcgan.data.device
    import fastcgan.devices
    from fastcgan.data import ensure_synthetic_dataset
    from fastcgan.train import train

    root = ensure_synthetic_dataset(str(tmp_path / "data"), size=32, n_train=4, n_test=2)
    monkeypatch.setattr(fastcgan.devices, "host_available_bytes", lambda: 4 * 32 * 32 * 3 * 2)  # 4/5 of it: short
    monkeypatch.setattr(fastcgan.data.device, "_stack_domain", None)  # decoding the bank would fail
    cfg = tiny_train_config(root, tmp_path, dataset="folder", data_on_gpu=True, preprocess="crop", max_steps=1)
    with pytest.raises(ConfigError, match=r"the decoded training set is 24\.0 KiB .* this process may allocate "
                       r"24\.0 KiB"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_each_switch_turns_one_thing_off(bf16_gpu):
    cfg, _ = parse_config(["--dataset", "synthetic", "--amp", "--no-compile", "--no-channels-last",
                           "--no-data-on-gpu"])  # fmt: skip
    r, line = resolve_fast_path(cfg, GPU, dataset_nbytes=1, free_memory=79 * GiB)
    assert (r.run.compile, r.run.channels_last, r.data.data_on_gpu) == (False, False, False)
    assert r.run.cuda_graphs is False  # the eager step is not captured by default
    cfg, _ = parse_config(["--dataset", "synthetic", "--amp", "--no-cuda-graphs"])
    r, _ = resolve_fast_path(cfg, GPU, dataset_nbytes=1, free_memory=79 * GiB)
    assert r.run.compile and not r.run.cuda_graphs


def test_cpu_default_is_the_measured_fastest():
    """On the CPU compile + channels_last measured slower than eager (0.91x at ResNet-6 128²), and
    channels_last alone is held back (see fastcgan/train/execution.py): auto leaves them off."""
    r, line = resolve_fast_path(tiny_train_config(), CPU, dataset_nbytes=1)
    assert (r.run.compile, r.run.channels_last, r.run.cuda_graphs, r.data.data_on_gpu) == (False,) * 4
    assert "fp32" in line and "--channels-last" in line
    # explicit flags are kept as given
    r, _ = resolve_fast_path(tiny_train_config(compile=True, channels_last=True), CPU)
    assert r.run.compile and r.run.channels_last


def test_faithful_is_the_official_numerics():
    r, line = resolve_fast_path(tiny_train_config(faithful=True), GPU, free_memory=79 * GiB)
    assert (r.run.compile, r.run.channels_last, r.run.cuda_graphs, r.data.data_on_gpu) == (False,) * 4
    assert r.run.kernels == "torch" and not r.run.amp and "official" in line
    st = build_state(r, CPU)
    opt = st.optimizers["G"]
    assert not opt.defaults.get("fused") and not opt.defaults.get("foreach")
    for bad in (dict(amp=True), dict(compile=True), dict(kernels="cpp"), dict(data_on_gpu=True)):
        with pytest.raises(ConfigError, match="--faithful"):
            resolve_fast_path(tiny_train_config(faithful=True, **bad), GPU, free_memory=79 * GiB)


def test_training_prints_what_is_on(tmp_path, capsys):
    from fastcgan.train import train

    train(tiny_train_config(str(tmp_path / "s"), tmp_path, max_steps=1, synthetic_train=2, synthetic_test=1))
    assert "fastcgan: on cpu: fp32" in capsys.readouterr().err


def test_state_holds_exactly_what_a_checkpoint_holds():
    st = build_state(tiny_train_config(), CPU)
    fields = {f.name for f in dataclasses.fields(TrainState)}
    assert fields == {"nets", "optimizers", "schedulers", "scaler", "pools", "aug_generator", "step", "epoch",
                      "batch_in_epoch"}  # fmt: skip
    payload = capture(st, {})
    assert set(payload["nets"]) == set(st.nets) and set(payload["optimizers"]) == set(st.optimizers)
    assert set(payload["schedulers"]) == set(st.schedulers) and set(payload["pools"]) == set(st.pools)
    # execution lives elsewhere: building a step adds nothing to the state
    before = dict(vars(st))
    step = build_step(st, tiny_train_config())
    assert vars(st).keys() == before.keys() and step.exe.state is st


def test_the_memory_a_process_may_take_follows_its_limits():
    """MemAvailable is the host's: a process capped by RLIMIT_AS (or a container's cgroup) passed
    the --data-on-gpu check and then died allocating. The least of what each allows counts."""
    import subprocess
    import sys

    code = "from fastcgan.devices import host_available_bytes as h; print(h())"
    free = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    cap = "import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.RLIM_INFINITY)); " + code
    capped = int(subprocess.run([sys.executable, "-c", cap], capture_output=True, text=True, check=True).stdout)
    assert 0 < capped < 6 << 30 and capped <= free


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_containers_page_cache_is_room(tmp_path, monkeypatch, version):
    """A cgroup's usage counts the page cache of files read (a dataset copied into a container),
    which the kernel reclaims at the limit: limit - usage alone said ~0 bytes there, and every CPU
    run would have been refused. Its inactive part counts as room, as kubelet counts it."""
    import fastcgan.devices as devices

    limit, usage, stat = tmp_path / "limit", tmp_path / "usage", tmp_path / "stat"
    limit.write_text("1000000\n" if version == "v2" else "1000000")
    usage.write_text("990000\n")
    key = "inactive_file" if version == "v2" else "total_inactive_file"
    stat.write_text(f"anon 1\nactive_file 7\n{key} 600000\nother 3\n")
    files = [(str(limit), str(usage), str(stat), key)]
    monkeypatch.setattr(devices, "CGROUP_MEMORY_FILES", files)
    assert devices.host_available_bytes() == 1000000 - 990000 + 600000
    stat.write_text("unreadable")  # no such counter: the usage as it is
    assert devices.host_available_bytes() == 10000
    limit.write_text("max\n")  # no limit: the host's MemAvailable
    assert devices.host_available_bytes() > 10000


@pytest.mark.parametrize("value, off", [("0", True), ("off", True), (" False ", True), ("NO", True), ("1", False),
                                        ("", False), ("00", False)])
def test_the_memory_check_is_turned_off_by_the_usual_words(monkeypatch, value, off):
    """FASTCGAN_MEMORY_CHECK=off (or false, no) left the check on without a word: only "0" was read."""
    import fastcgan.devices as devices

    monkeypatch.setattr(devices, "free_memory", lambda device: 123)
    monkeypatch.setenv("FASTCGAN_MEMORY_CHECK", value)
    assert devices.memory_to_check(torch.device("cpu")) == (None if off else 123)


def test_memory_sizes_in_messages_keep_their_magnitude():
    """A refusal of a small run said "0.0 MiB" for tens of KiB (the sizes compared were not zero)."""
    from fastcgan.devices import format_bytes

    assert [format_bytes(n) for n in (0, 1023, 24 * 1024, 1024 ** 2 - 1, 3 * 1024 ** 2, 1.5 * 1024 ** 3)] == [
        "0 B", "1023 B", "24.0 KiB", "1024.0 KiB", "3.0 MiB", "1.5 GiB"]


def test_a_bank_that_no_longer_fits_is_a_dataset_error_naming_the_flag(monkeypatch):
    from fastcgan.data import DatasetError
    from fastcgan.data.device import BankStack

    def no_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 7812500000 bytes")

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(DatasetError, match=r"--data-on-gpu: 32,000 images of \(3, 286, 286\) \(7\.3 GiB\) do not "
                                           r"fit on cpu; use --no-data-on-gpu"):
        BankStack(32_000, torch.device("cpu")).append(torch.zeros(3, 286, 286, dtype=torch.uint8))


def test_allocating_the_pools_keeps_the_fakes_a_resumed_pool_holds():
    """A --compile run allocates its image pools before the first compiled phase; a resumed run's
    pools already hold the checkpoint's fakes, which must survive that (else the resumed run shows D
    other fakes than the uninterrupted run, and resume is not exact)."""
    from fastcgan.recipes import get_recipe

    cfg = tiny_train_config(pool_size=4)
    st = build_state(cfg, CPU)
    g = torch.Generator().manual_seed(0)
    for pool in st.pools.values():
        pool.query(torch.rand(3, 3, 32, 32, generator=g) * 2 - 1)  # as loaded from a checkpoint
    held = {n: (p.images.clone(), int(p.num_imgs)) for n, p in st.pools.items()}
    assert held and all(count == 3 for _, count in held.values())
    exe = build_step(st, cfg).exe
    exe.allocate_pools(get_recipe(cfg.model.recipe), cfg, {d: torch.zeros(1, 3, 32, 32) for d in "AB"})
    for n, (images, count) in held.items():
        assert int(st.pools[n].num_imgs) == count and torch.equal(st.pools[n].images, images), n


def test_free_gpu_memory_counts_the_allocators_unused_blocks_without_a_gpu(monkeypatch):
    """Catches: free_memory without `+ unused`, or unused = reserved (not reserved - allocated).
    The existing test of this is @cuda (skipped on every CPU run); mocked here."""
    from fastcgan.devices import free_memory

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    assert free_memory(torch.device("cuda")) == 1000 + 200


def test_meminfo_is_read_in_kib_and_the_first_cgroup_found_counts(tmp_path, monkeypatch):
    """Catches: MemAvailable taken as bytes (its kB not * 1024: every CPU room 1024x too small), and the
    `break` after the first cgroup (v2) found dropped (a v1 file after it would count too)."""
    import resource

    import fastcgan.devices as devices

    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    monkeypatch.setattr(devices, "CGROUP_MEMORY_FILES", ())
    monkeypatch.setattr(resource, "getrlimit", lambda r: (resource.RLIM_INFINITY,) * 2)  # no rlimit counts
    assert abs(devices.host_available_bytes() - kib * 1024) < 1 << 30  # MemAvailable moves a little
    for name, text in {"lim2": "1000000", "use2": "0", "lim1": "10", "use1": "0"}.items():
        (tmp_path / name).write_text(text)
    files = ((str(tmp_path / "lim2"), str(tmp_path / "use2"), str(tmp_path / "none"), "inactive_file"),
             (str(tmp_path / "lim1"), str(tmp_path / "use1"), str(tmp_path / "none"), "total_inactive_file"))
    monkeypatch.setattr(devices, "CGROUP_MEMORY_FILES", files)
    assert devices.host_available_bytes() == 1000000  # v2 found: the v1 entry is not read
    (tmp_path / "use2").write_text("2000000")  # over its limit (the kernel lets usage pass it briefly): no room
    assert devices.host_available_bytes() == 0


def test_autocast_off_on_meta_is_silent():
    """Catches: autocast_off always entering torch.autocast (on meta torch warns that autocast is not
    supported there; the step-memory count runs CUT's PatchNCE under it on meta)."""
    import warnings as w

    from fastcgan.devices import autocast_off

    with w.catch_warnings():
        w.simplefilter("error")
        with autocast_off("meta"):
            pass


def test_a_process_rlimit_counts_what_it_has_used(monkeypatch):
    """Catches: the RLIMIT_AS room taken as the whole limit (not limit - VmSize), and VmSize / VmData
    paired the wrong way. The subprocess test only checks `capped < 6 GiB`, which holds on any
    machine with less than 6 GiB available whatever the arithmetic."""
    import resource

    import fastcgan.devices as devices

    monkeypatch.setattr(devices, "CGROUP_MEMORY_FILES", ())
    with open("/proc/self/status") as f:
        vm = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
              if k in ("VmSize", "VmData")}
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        cap = vm[used] + (1 << 30)  # 1 GiB beyond what this process has mapped
        monkeypatch.setattr(resource, "getrlimit",
                            lambda r, limit=limit, cap=cap: (cap, resource.RLIM_INFINITY) if r == limit
                            else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        room = devices.host_available_bytes()
        assert abs(room - (1 << 30)) < 64 << 20, (used, room)  # what is mapped moves a little


def test_execution_flags_judged_on_a_gpu():
    """Catches: --cudnn-benchmark refused on CUDA (device test dropped), and --compile-backend refused
    when --compile is on. Only the CPU cases were tested."""
    from fastcgan.train.execution import unused_execution_flags

    cfg = tiny_train_config()
    assert unused_execution_flags(cfg, {"cudnn_benchmark": True}, torch.device("cuda")) == []
    assert unused_execution_flags(cfg.replace(compile=True), {"compile_backend": "aot_eager"},
                                  torch.device("cpu")) == []


def test_a_bank_that_exactly_fits_is_kept():
    """Catches: `nbytes * copies <= share * room` -> `<` in check_bank_fits."""
    from fastcgan.train.execution import check_bank_fits

    check_bank_fits(30 << 30, torch.device("cuda"), 30 << 30)  # a GPU: all of its free memory
    with pytest.raises(ConfigError, match="cuda has 30.0 GiB free"):
        check_bank_fits((30 << 30) + 1, torch.device("cuda"), 30 << 30)


def test_format_bytes_at_unit_boundaries_and_out_of_memory_words():
    """Catches: ``n >= 1024 ** power`` -> ``>`` ("1024 B"), fractional bytes printed as floats, and
    allocation failures said in C++'s or onnxruntime's words not recognised (a traceback instead of
    the one-line out-of-memory error)."""
    from fastcgan.devices import format_bytes, is_out_of_memory

    assert [format_bytes(n) for n in (1024, 1 << 20, 1 << 30, 512.7)] == ["1.0 KiB", "1.0 MiB", "1.0 GiB", "512 B"]
    for said in ("std::bad_alloc", "CUDA failure 2: out of memory", "DefaultCPUAllocator: can't allocate memory",
                 "Failed to allocate memory for requested buffer"):
        assert is_out_of_memory(RuntimeError(said)), said
    assert not is_out_of_memory(RuntimeError("shape mismatch"))

