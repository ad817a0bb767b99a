"""What a person sees during a run: progress bar, TensorBoard, ``metrics.jsonl``, sample grids.

Nothing here changes the training state: losses are summed on the device and read to the host
once every ``log_every`` steps (:class:`LossAccumulator`), sample grids run the networks in eval
mode without gradients and draw no random numbers, so logging can never change what is trained.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

import torch

from fastcgan.fileio import WriteError, atomic_writer, describe_os_error, parse_json


class LossAccumulator:
    """Sums the step's device-scalar losses on the device; :meth:`read` is the one host read
    (under DDP the mean over processes, so every process sees the same numbers)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.total = None
        self.count = 0

    def add(self, losses: dict) -> None:
        vec = torch.stack([losses[k] for k in self.names])
        self.total = vec if self.total is None else self.total + vec
        self.count += 1

    def read(self, mean=lambda x: x) -> dict[str, float]:
        """The means since the last read (empty if nothing was added); resets."""
        if self.total is None:
            return {}
        vals = mean(self.total / self.count).tolist()  # device -> host: the sync point
        self.total, self.count = None, 0
        return dict(zip(self.names, vals))


@torch.no_grad()
def sample_grid(exe, recipe, images: dict[str, torch.Tensor]) -> torch.Tensor:
    """A [0, 1] grid of the recipe's sample rows (``recipe.sample_rows``) for uint8 ``images``.

    The networks run in eval mode through their plain ``forward`` (eager even when compiled) and
    are put back in train mode: sampling draws no random numbers and changes no buffers."""
    from torchvision.utils import make_grid

    from fastcgan.data import to_model_range

    nets = list(exe.state.nets.values())
    modes = [n.training for n in nets]
    for n in nets:
        n.eval()
    try:
        with exe.autocast():
            rows = recipe.sample_rows(exe, {k: exe.fmt(to_model_range(v.to(exe.device))) for k, v in images.items()})
    finally:
        for n, m in zip(nets, modes):
            n.train(m)
    tiles = [t.float().expand(3, -1, -1) if t.shape[0] == 1 else t.float() for row in rows for t in row]
    grid = make_grid(torch.stack(tiles), nrow=len(rows[0]), padding=2, pad_value=1.0)
    return ((grid + 1) / 2).clamp(0, 1).cpu()


# A metrics.jsonl record is ~300 bytes; a longer "line" is not one of ours (read in pieces, dropped).
_MAX_RECORD = 1 << 16


def _lines(f):
    """Each line of ``f`` (the last may lack its newline), ``None`` for one over _MAX_RECORD:
    never more than one record in memory."""
    while line := f.readline(_MAX_RECORD):
        if len(line) == _MAX_RECORD and not line.endswith(b"\n"):
            while (rest := f.readline(_MAX_RECORD)) and not rest.endswith(b"\n"):
                pass
            line = None
        yield line


def _drop_records_after(path: str, step: int) -> None:
    """A run resumed at ``step`` logs the steps after it again: the records an interrupted run
    wrote past its last checkpoint (and a line cut short by a crash, or one that is not a record)
    are removed first, so ``metrics.jsonl`` keeps one history with increasing steps. Streamed:
    a long run's file (1.5 M lines at --log-every 1, 0.5 GB) is never held in memory."""

    def kept(line) -> bool:
        try:
            record = parse_json(line) if line is not None else None
        except ValueError:
            return False  # cut short by a crash, or not JSON
        if not isinstance(record, dict):
            return line is not None
        s = record.get("step", 0)
        return isinstance(s, (int, float)) and not isinstance(s, bool) and s <= step

    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        if all(line is not None and line.endswith(b"\n") and kept(line) for line in _lines(f)):
            return  # nothing to drop: the file stays as it is (the usual resume)
        f.seek(0)
        with atomic_writer(path) as out:
            for line in _lines(f):
                if kept(line):
                    out.write(line if line.endswith(b"\n") else line + b"\n")


def _fmt_num(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


class RunLogger:
    def __init__(
        self,
        run_dir: str,
        total_steps: int,
        start_step: int,
        batch_size: int,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool = True,
        bar_keys: tuple[str, ...] = ("G", "D"),
    ):
        """``enabled=False`` (DDP processes other than 0): no files, no bar, no messages.
        ``bar_keys``: the losses shown in the progress bar."""
        self.bar_keys = bar_keys
        self.run_dir = run_dir
        self.enabled = enabled
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self._last_t = self.t0
        self._last_step = start_step
        self._metrics = None
        self._failed = False
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        _drop_records_after(metrics, start_step)
        self._metrics_path = metrics
        self._metrics = open(metrics, "a", buffering=1)
        if tensorboard:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter

                # purge_step: events past the checkpoint a resumed run starts from are hidden.
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)
            except Exception as e:  # tensorboard missing or broken: log elsewhere, keep training
                print(f"fastcgan: TensorBoard logging disabled ({type(e).__name__}: {e})", file=sys.stderr)
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="it",
                dynamic_ncols=True,
                smoothing=0.1,
                desc="train",
            )

    # -- per step (no device reads) -----------------------------------------------------------
    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    # -- every log_every steps ----------------------------------------------------------------
    def log(
        self, step: int, epoch: int, losses: dict[str, float], lr: float, data_wait: float = 0.0
    ) -> dict:
        """``data_wait``: seconds the loop spent waiting for batches since the last call; its
        share of the wall time says whether data or compute bounds the step."""
        now = time.perf_counter()
        dt = max(now - self._last_t, 1e-9)
        data_frac = min(1.0, data_wait / dt)
        ips = (step - self._last_step) * self.batch_size / dt
        self._last_t, self._last_step = now, step
        rec = {
            "step": step,
            "epoch": epoch,
            "time": round(now - self.t0, 3),
            "lr": lr,
            "images_per_s": round(ips, 3),
            "data_wait_frac": round(data_frac, 4),
            **{k: v for k, v in losses.items()},
        }
        if not self.enabled:
            return rec
        self._append(rec)
        if self.tb is not None:
            for k, v in losses.items():
                self.tb.add_scalar(f"loss/{k}", v, step)
            self.tb.add_scalar("lr", lr, step)
            self.tb.add_scalar("images_per_s", ips, step)
            self.tb.add_scalar("data_wait_frac", data_frac, step)
        if self.bar is not None:
            # The recipe's headline losses (short); every loss goes to TensorBoard / metrics.jsonl.
            post = {k: _fmt_num(losses[k]) for k in self.bar_keys if k in losses}
            post["img/s"] = f"{ips:.1f}"
            # More than a fifth of the time waiting for batches: the loader bounds the step
            # (try --data-on-gpu or more --num-workers); otherwise compute does.
            post["data"] = f"{100 * data_frac:.0f}%" + (" (data-bound)" if data_frac > 0.2 else "")
            self.bar.set_postfix(post, refresh=False)
        return rec

    def log_eval(self, step: int, metrics: dict[str, float], network: str) -> None:
        """FID/KID of the current generators: a ``metrics.jsonl`` line and TensorBoard scalars."""
        if not self.enabled:
            return
        self._append({"step": step, "eval": metrics, "eval_network": network})
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"eval/{k}", v, step)
        self.message(f"fastcgan: step {step}: " + "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def sample(self, step: int, grid: torch.Tensor) -> str:
        """Save a [0, 1] image grid as ``samples/step_<step>.png`` (and to TensorBoard)."""
        from torchvision.utils import save_image

        path = os.path.join(self.run_dir, "samples", f"step_{step:09d}.png")
        with atomic_writer(path) as f:
            save_image(grid, f, format="png")
        if self.tb is not None:
            self.tb.add_image("samples", grid, step)
        return path

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self._metrics is not None and not self._metrics.closed:
            try:
                self._metrics.close()
            except OSError as e:  # the last line's flush; after a failed append, already reported
                if not self._failed:
                    raise self._write_error(e) from None

    def _append(self, record: dict) -> None:
        """One line of ``metrics.jsonl``; a failed write (a full disk) is a :class:`WriteError`
        naming the file, not a traceback from inside the logger."""
        try:
            self._metrics.write(json.dumps(record) + "\n")
        except OSError as e:
            self._failed = True
            raise self._write_error(e) from None

    def _write_error(self, e: OSError) -> WriteError:
        return WriteError(e.errno, f"could not write {self._metrics_path}: {describe_os_error(e)} (the lines "
                          "before are kept; every checkpoint already written is complete)")
