"""What a person sees during a run: progress bar, TensorBoard, ``metrics.jsonl``, sample grids.

Nothing here touches the training state: the loop hands over host numbers (read from the device
every ``log_every`` steps) and image tensors, so logging can never change what is trained.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings

import torch

# Loss keys shown in the progress bar (short), the rest go to TensorBoard / metrics.jsonl only.
_BAR_KEYS = ("G", "cycle_A", "cycle_B", "D_A", "D_B")


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
    ):
        self.run_dir = run_dir
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self._last_t = self.t0
        self._last_step = start_step
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        self._metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        self.tb = None
        if tensorboard:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except Exception as e:  # tensorboard missing or broken: log elsewhere, keep training
                print(f"fastcgan: TensorBoard logging disabled ({type(e).__name__}: {e})", file=sys.stderr)
        self.bar = None
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
    def log(self, step: int, epoch: int, losses: dict[str, float], lr: float) -> dict:
        now = time.perf_counter()
        dt = max(now - self._last_t, 1e-9)
        ips = (step - self._last_step) * self.batch_size / dt
        self._last_t, self._last_step = now, step
        rec = {
            "step": step,
            "epoch": epoch,
            "time": round(now - self.t0, 3),
            "lr": lr,
            "images_per_s": round(ips, 3),
            **{k: v for k, v in losses.items()},
        }
        self._metrics.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in losses.items():
                self.tb.add_scalar(f"loss/{k}", v, step)
            self.tb.add_scalar("lr", lr, step)
            self.tb.add_scalar("images_per_s", ips, step)
        if self.bar is not None:
            post = {k: _fmt_num(losses[k]) for k in _BAR_KEYS if k in losses}
            post["img/s"] = f"{ips:.1f}"
            self.bar.set_postfix(post, refresh=False)
        return rec

    def sample(self, step: int, grid: torch.Tensor) -> str:
        """Save a [0, 1] image grid as ``samples/step_<step>.png`` (and to TensorBoard)."""
        from torchvision.utils import save_image

        path = os.path.join(self.run_dir, "samples", f"step_{step:09d}.png")
        save_image(grid, path)
        if self.tb is not None:
            self.tb.add_image("samples", grid, step)
        return path

    def message(self, text: str) -> None:
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
        if not self._metrics.closed:
            self._metrics.close()
