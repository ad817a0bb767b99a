"""Shared test setup.

* Without a GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set
  before any ``@triton.jit`` function is defined, so it is set here, first.
* Tests marked ``cuda`` are skipped cleanly when no CUDA device is visible.
* ``FASTCGAN_REQUIRE_NATIVE=1`` (set by ``make test``, so CI) makes a missing ``fastcgan._C`` an
  error rather than a reason to skip the native tests.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def pytest_sessionstart(session):
    """With ``FASTCGAN_REQUIRE_NATIVE=1`` (CI: ``make test``) a missing or broken native library
    fails the run at once, with the loader's reason, instead of skipping every native test."""
    if os.environ.get("FASTCGAN_REQUIRE_NATIVE", "0") != "1":
        return
    from fastcgan.ops import available_backends

    cpp = available_backends()["cpp"]
    if not cpp.available:
        pytest.exit(
            f"FASTCGAN_REQUIRE_NATIVE=1 but the native op library cannot be used: {cpp.reason}",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def monet2photo_mini():
    """The real mini Monet<->photo set in ../shared/data (never copied into the repository)."""
    root = os.path.join(SHARED_DATA, "monet2photo_mini")
    if not os.path.isdir(root):
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.fixture
def one_thread():
    """Tiny training runs gain nothing from threads, and on a shared 2-core machine a second
    OpenMP thread competing with other processes makes each step ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def resnet_builds(monkeypatch):
    """The device type of every ResnetGenerator built while the test runs ("meta": checked, not
    allocated)."""
    from fastcgan.models import generators

    built = []
    real_init = generators.ResnetGenerator.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        built.append(next(self.parameters()).device.type)

    monkeypatch.setattr(generators.ResnetGenerator, "__init__", spy)
    return built


def tiny_train_config(root=None, out=None, **overrides):
    """The one tiny training config of the suite (CPU, ngf/ndf 4, 32² synthetic data, no
    periodic samples/checkpoints/FID, quiet); each test overrides only what it is about."""
    from fastcgan.train import TrainConfig

    base = dict(
        dataset="synthetic",
        load_size=32,
        crop_size=32,
        ngf=4,
        ndf=4,
        num_workers=0,
        name="run",
        log_every=1,
        sample_every=1000,
        checkpoint_every=1000,
        eval_every=0,
        tensorboard=False,
        progress=False,
        device="cpu",
        n_samples=2,
        synthetic_train=8,
        synthetic_test=4,
    )
    if root is not None:
        base["dataroot"] = str(root)
    if out is not None:
        base["output_dir"] = str(out)
    base.update(overrides)
    preset = base.pop("preset", "cyclegan128")
    return TrainConfig.from_preset(preset, **base)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Networks and batches built inside are ``dtype`` (fp64: compare two code paths' arithmetic
    without fp32 rounding, which an ill-conditioned tiny network amplifies ~1000x)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def assert_grads_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    """Gradients equal up to reduction order: each tensor's tolerance is relative to its own
    scale (an element near zero in a tensor of scale 1 may differ by rtol, not rtol of itself),
    plus ``atol`` for tensors that are rounding noise (a conv bias before InstanceNorm)."""
    assert got.keys() == want.keys()
    for k, ref in want.items():
        torch.testing.assert_close(got[k], ref, rtol=rtol, atol=rtol * ref.abs().max().item() + atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


def two_steps_in_lockstep(states: dict, steps: dict, make_batch) -> dict:
    """``{compiled: (losses of step 1, gradients of step 1, losses of step 2)}`` for the eager
    (``False``) and compiled (``True``) states and steps, built alike; batches from
    ``make_batch(seed)``. Before step 2 the compiled state takes the eager one's weights and Adam
    moments, so that step 2 compares the steps, not Adam's amplified rounding."""
    res = {}
    for comp, st in states.items():
        torch.manual_seed(5)
        out = steps[comp](make_batch(1))
        grads = {f"{n}.{k}": p.grad.clone() for n, net in st.nets.items() for k, p in net.named_parameters()
                 if p.grad is not None}
        res[comp] = (out, grads)
    _copy_training_state(states[True], states[False])
    for comp in states:
        torch.manual_seed(6)
        res[comp] += (steps[comp](make_batch(2)),)
    return res


def _copy_training_state(dst, src) -> None:
    """Make ``dst`` (a TrainState) continue from ``src``'s weights and optimizer moments, in place
    (a built step keeps referencing ``dst``'s parameters). Two runs compared over several steps
    otherwise drift apart through Adam: its first update is ~lr * sign(g), so a gradient element
    near zero whose rounding differs flips a whole lr-sized step. Not ``Optimizer.load_state_dict``:
    it keeps the given tensors themselves when dtype and device match, so ``dst`` would share
    ``src``'s moments and each step would advance them twice (tried: CUT's step 2 moved by 9e-6)."""
    with torch.no_grad():
        for name, net in dst.nets.items():
            for t, s in zip(net.state_dict().values(), src.nets[name].state_dict().values()):
                t.copy_(s)
    for name, opt in dst.optimizers.items():
        theirs = src.optimizers[name]
        for p, q in zip((p for g in opt.param_groups for p in g["params"]),
                        (q for g in theirs.param_groups for q in g["params"])):
            mine = opt.state[p]
            for key, v in theirs.state.get(q, {}).items():
                if torch.is_tensor(v) and torch.is_tensor(mine.get(key)):
                    mine[key].copy_(v)
                else:
                    mine[key] = v.clone() if torch.is_tensor(v) else v


@pytest.fixture
def tiny_config():
    """:func:`tiny_train_config` as a fixture."""
    return tiny_train_config
