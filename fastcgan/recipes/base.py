"""What a training recipe is: the small module that says *what* is trained.

The trainer (``fastcgan.train``) owns everything shared -- data, AMP, compile, CUDA graphs, DDP,
checkpoints, logging, export. A recipe owns only:

* ``networks(cfg)``: its modules by name (``{"G_AB": ..., "D_B": ...}``);
* ``optimizers``: which networks each optimizer updates (``{"G": ("G_AB", "G_BA"), ...}``);
* ``pools(cfg)``: its image pools: name -> (size, image channels), part of the state;
* ``phases``: the step, as an ordered tuple of :class:`Phase` -- each a pure forward function
  returning the loss one optimizer minimises (the trainer runs backward and the update), or,
  with no optimizer, only tensors for later phases (pix2pix's generator forward);
* ``loss_names(cfg)``: the keys of the losses the step reports, in order;
* ``sample_rows(run, images)``: the rows of its sample grid;
* ``exports``: which networks are the deployable generators (``{"AtoB": "G_AB"}``), and
  ``deployable(net)`` when the trained network is not itself the image-to-image generator (colorization
  wraps its L -> ab network into an RGB -> RGB one);
* ``official_networks``: its networks by the name the official repository saves them under
  (``{"G_A": "G_AB", ...}``: ``latest_net_G_A.pth``), to continue an official run;
* its data, when it is not unpaired A/B folders: ``dataset(cfg, root, phase)``,
  ``synthetic(cfg, root)`` (the built-in data with ground truth) and ``augment(batch, **kw)``
  (uint8 batch -> model inputs; pix2pix crops both halves of a pair alike).

A new method (pix2pix, CUT) is one new file in ``fastcgan/recipes/`` that builds a
:class:`Recipe`, plus its line in ``RECIPES`` -- never an edit of the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Protocol

import torch
from torch import Tensor, nn


class StepRun(Protocol):
    """The view of the state a phase's forward function gets (built by ``fastcgan.train.execution``).

    ``net(name)``: the module to call (its DDP wrapper when distributed, the plain one otherwise);
    ``frozen(name)``: the plain module, for networks this phase does not update;
    ``pool(name)`` + ``pool_query(pool, fakes)``: the image pools (global batch under DDP);
    ``autocast()``: the mixed-precision context; ``fmt(x)``: x in the run's memory format."""

    def net(self, name: str) -> nn.Module: ...

    def frozen(self, name: str) -> nn.Module: ...

    def pool_query(self, pool: str, fakes: Tensor) -> Tensor: ...

    def autocast(self): ...

    def fmt(self, x: Tensor) -> Tensor: ...


# forward(run, batch, carry, cfg) -> (loss to minimise, {name: loss tensor}, carry for later phases)
PhaseForward = Callable[[StepRun, Mapping[str, Tensor], dict, object], tuple[Tensor, dict, dict]]


def max_dataset_size(cfg, phase: str) -> float:
    """Images per domain a dataset of ``phase`` may hold: ``--max-dataset-size`` for training,
    every image of a test split (evaluation has its own ``--eval-max-images``)."""
    n = cfg.data.max_dataset_size
    return n if phase == "train" and n is not None else math.inf


def generator_options(cfg, **overrides) -> dict:
    """``build_generator`` keywords from the run's config (arch and channels are the recipe's)."""
    m = cfg.model
    options = {
        "ngf": m.ngf, "norm": m.norm, "use_dropout": m.use_dropout, "init_type": m.init_type,
        "init_gain": m.init_gain, "backend": cfg.run.kernels, "antialias": m.antialias, "antialias_up": m.antialias_up,
    }
    return options | overrides


def discriminator_options(cfg, **overrides) -> dict:
    """``build_discriminator`` keywords from the run's config (arch and input channels are the recipe's)."""
    m = cfg.model
    options = {
        "ndf": m.ndf, "n_layers": m.n_layers_D, "norm": m.norm, "init_type": m.init_type, "init_gain": m.init_gain,
        "backend": cfg.run.kernels, "antialias": m.antialias,
    }
    return options | overrides


@dataclass(frozen=True)
class Phase:
    """One optimizer update of the step. ``frozen``: networks the forward calls but must not
    update (their parameters' ``requires_grad`` is off for this phase, which skips their weight
    gradients while the gradient still flows through them to the inputs). ``compilable``: the
    forward may be ``torch.compile``d with ``fullgraph=True`` for this config.

    ``optimizer=None``: a forward-only phase -- no backward, no update; its carry (with autograd
    history) goes to later phases, whose backward runs through it. A tensor that one phase's
    backward needs must not come from the compiled graph of an *earlier phase with a backward*:
    that graph is one autograd node, freed by the first backward through it."""

    name: str
    optimizer: Optional[str]
    forward: PhaseForward
    frozen: tuple[str, ...] = ()
    compilable: Callable[[object], bool] = lambda cfg: True


@dataclass(frozen=True)
class Recipe:
    name: str
    networks: Callable[[object], dict[str, nn.Module]]
    optimizers: Mapping[str, tuple[str, ...]]
    pools: Callable[[object], dict[str, tuple[int, int]]]
    phases: tuple[Phase, ...]
    loss_names: Callable[[object], tuple[str, ...]]
    sample_rows: Callable[[StepRun, dict[str, Tensor]], list[list[Tensor]]]
    exports: Mapping[str, str]
    progress_keys: tuple[str, ...] = ("G", "D")  # the losses the progress bar shows
    dataset: Callable = None  # (cfg, root, phase) -> dataset; None: unaligned A/B folders
    synthetic: Callable = None  # (cfg, root) -> root of the built-in data; None: unpaired synthetic
    synthetic_folder: str = "synthetic"  # without --dataroot it is OUTPUT_DIR/<synthetic_folder>_<load size>
    augment: Callable = None  # (uint8 batch, generator=, channels_last=, shard=, **aug) -> inputs
    deployable: Callable = None  # (trained network) -> the generator saved, scored and exported
    # Official checkpoint name -> network: EPOCH_net_NAME.pth of an official run holds that network.
    official_networks: Mapping[str, str] = field(default_factory=dict)
    # A one-way unpaired recipe (CUT): --direction BtoA reads the {phase}B folders as its input
    # domain, as the official unaligned dataset does, and its generator is the run's BtoA one.
    reversible: bool = False
    # The dataset makes both images of a pair from one RGB image (colorization: its L and ab), so
    # the loader's batch holds that image in "A" and nothing in "B" (the datasets' own ``target_from_input``).
    target_from_input: bool = False
    # When the official training script steps the LR schedules: the CycleGAN / pix2pix repository's
    # train.py calls update_learning_rate() at the start of every epoch (epoch k runs at the
    # schedule's k-th step: the linear decay starts an epoch before --epochs ends and the last
    # epoch runs at 0), CUT's train.py at the end of every epoch (epoch k runs at step k - 1).
    lr_update_at_epoch_start: bool = True
    # The official CUT's unaligned dataset resizes to --crop-size (no zoom crop, only the flip)
    # in the epochs past --epochs, while its LR decays ("is_finetuning").
    no_zoom_when_decaying: bool = False

    def reversed_domains(self, cfg) -> bool:
        """Whether this run reads ``{phase}B`` as its input domain (``--direction BtoA``)."""
        return self.reversible and cfg.data.direction == "BtoA"

    def exports_for(self, cfg) -> Mapping[str, str]:
        """The run's generators, direction -> network: :attr:`exports`, or for a reversed run the
        same network as the ``BtoA`` generator (``generator_BtoA.safetensors``: scored on the B
        images, as a CycleGAN's G_BA)."""
        if self.reversed_domains(cfg):
            return {"BtoA": net for net in self.exports.values()}
        return self.exports

    def deployed(self, net: nn.Module) -> nn.Module:
        """The generator ``net`` (an ``exports`` network) is deployed as (shares its parameters)."""
        return net if self.deployable is None else self.deployable(net)

    def build_dataset(self, cfg, root: str, phase: str = "train"):
        if self.dataset is not None:
            return self.dataset(cfg, root, phase)
        from fastcgan.data import UnalignedDataset

        d, m = cfg.data, cfg.model
        return UnalignedDataset(
            root, phase, preprocess=d.preprocess, load_size=d.load_size, crop_size=d.crop_size, flip=d.flip,
            input_nc=m.input_nc, output_nc=m.output_nc, serial_batches=d.serial_batches, seed=cfg.run.seed,
            max_size=max_dataset_size(cfg, phase), reverse=self.reversed_domains(cfg),
        )

    def make_synthetic(self, cfg, root: str) -> str:
        if self.synthetic is not None:
            return self.synthetic(cfg, root)
        from fastcgan.data import ensure_synthetic_dataset

        d = cfg.data
        return ensure_synthetic_dataset(root, size=d.load_size, n_train=d.synthetic_train, n_test=d.synthetic_test)

    def augment_batch(self, batch: Mapping[str, Tensor], **kw) -> dict[str, Tensor]:
        """uint8 ``{"A", "B"}`` on the device -> float model inputs in [-1, 1] (random crop/flip
        drawn from ``kw["generator"]``)."""
        if self.augment is not None:
            return self.augment(batch, **kw)
        from fastcgan.data import augment_batch

        return {d: augment_batch(batch[d], **kw) for d in ("A", "B")}

    def check(self) -> None:
        """Structural consistency (run by the registry, so a broken recipe fails at import)."""
        opts = set(self.optimizers)
        for ph in self.phases:
            if ph.optimizer is not None and ph.optimizer not in opts:
                raise ValueError(f"recipe {self.name}: phase {ph.name} uses unknown optimizer {ph.optimizer}")


def set_requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def zero_loss(like: Tensor) -> Tensor:
    return like.new_zeros((), dtype=torch.float32)
