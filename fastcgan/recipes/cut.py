"""CUT and FastCUT (Park et al., ECCV 2020, Contrastive Unpaired Translation): ``--model cut`` with
the presets ``cut`` and ``fastcut`` (``fastcgan.train.config.PRESETS``).

One generator ``G`` (A -> B), one discriminator ``D`` (B images) and ``F``, the PatchNCE projection
heads (one 2-layer MLP per NCE layer, built up front from G's known channel counts:
:func:`fastcgan.models.patchnce.build_patchnce_heads`). Losses: ``lambda_gan`` x GAN(D(G(a))) and
``lambda_nce`` x PatchNCE between G(a) and a -- each output patch is tied to the input patch at the
same place through G's own encoder features at ``--nce-layers`` (official ``0,4,8,12,16``; which of
our modules those are: :meth:`fastcgan.models.generators.ResnetGenerator.encode`). CUT adds the
NCE identity term PatchNCE(G(b), b) and averages the two, ``(NCE + NCE_Y) / 2``; FastCUT drops it
(half the generator work), uses ``lambda_nce`` 10 and flip-equivariance.

The step is the official ``optimize_parameters`` -- one forward, the discriminator's update on the
detached fake, then one backward of ``loss_G_GAN + loss_NCE`` into G and F against the *updated*
D -- as three phases:

* ``forward`` (no optimizer): ``G([real_A; real_B])`` in one batched call (as the official; the
  B half is the NCE identity image), with G's graph kept for the last phase, and the NCE keys:
  G's features of the input, taken from that same forward (no second encoder pass). With
  flip-equivariance the forward runs on the input flipped left-right with probability 1/2 (a coin
  drawn on the device) and the keys are the features of the *unflipped* input (a separate
  no-grad encode), as the official;
* ``discriminator``: ``0.5 * (gan(D(B), real) + gan(D(fake_B.detach()), fake))``;
* ``generator`` (D frozen): the queries are G's features of its output (flipped back when the
  input was flipped), the keys and queries are sampled at the same random locations
  (``num_patches`` per layer, drawn on the device), projected by F and scored by
  :func:`fastcgan.losses_nce.patch_nce_loss` (internal negatives, temperature ``nce_T``, fp32
  logits). One optimizer updates G and F together (one Adam over both with the same
  hyper-parameters is exactly the official ``optimizer_G`` + ``optimizer_F``; both follow the
  same LR schedule, as the official's).

Differences from the official code, none of which changes the objective: patch locations are
drawn per image (:func:`patch_ids`: ``torch.rand`` + ``argsort``, the same distribution per image
as the official draw shared by the batch; capturable in a CUDA graph, no host sync, and under DDP
drawn for the global batch) -- with ``--nce-includes-all-negatives-from-minibatch`` one draw is
shared by the batch, as the official, since there the other images' patches are the negatives;
the keys go through F without a graph (the loss detaches them anyway); the NCE and NCE-identity
terms come from one encode of ``[fake_B; idt_B]`` and one F call. Under DDP G's forward runs
through its DDP wrapper (so its gradients are all-reduced) and the keys come from a separate
no-grad encode of the plain module (a DDP wrapper only runs ``forward``); the query encode runs on
the plain module, whose gradient joins G's DDP-tracked backward.

Naming: ``G`` translates A -> B (the official ``netG``), exported as ``AtoB``. With ``--direction
BtoA`` (the official option: its unaligned dataset hands the B images to the model as input) the
run reads ``trainB`` as its input domain and ``trainA`` as its target, and ``G`` is exported as
``BtoA`` (``generator_BtoA.safetensors``, scored on ``testB`` against ``testA``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcgan.losses import gan_loss, generator_gan_loss
from fastcgan.losses_nce import patch_nce_loss
from fastcgan.models.patchnce import gather_patches
from fastcgan.recipes.base import Phase, Recipe, StepRun, discriminator_options, generator_options, zero_loss


def parse_nce_layers(spec: str) -> tuple[int, ...]:
    """``"0,4,8,12,16"`` (the official ``--nce_layers`` syntax) -> ``(0, 4, 8, 12, 16)``."""
    try:
        layers = tuple(int(s) for s in str(spec).split(",") if s.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {spec!r}") from None
    if not layers:
        raise ValueError("needs at least one layer")
    return layers


def loss_names(cfg) -> tuple[str, ...]:
    # The official names (G_GAN, D_real, D_fake, G, NCE, NCE_Y), plus D (the minimised total).
    idt = ("NCE_Y",) if cfg.loss.nce_idt else ()
    return ("G_GAN", "NCE") + idt + ("G", "D_real", "D_fake", "D")


def networks(cfg) -> dict:
    from fastcgan.models import build_discriminator, build_generator
    from fastcgan.models.patchnce import build_patchnce_heads

    m = cfg.model
    # Built in the official order (G, D, then F): the global RNG draws of the initialisation.
    G = build_generator(m.netG, m.input_nc, m.output_nc, **generator_options(cfg))
    D = build_discriminator(m.netD, m.output_nc, **discriminator_options(cfg))
    F = build_patchnce_heads(
        G, parse_nce_layers(m.nce_layers), m.netF_nc, init_type=m.init_type, init_gain=m.init_gain
    )
    return {"G": G, "D": D, "F": F}


def pools(cfg) -> dict[str, tuple[int, int]]:
    # The official CUT has no image pool (preset pool_size 0); --pool-size N adds one for D.
    return {"pool_B": (cfg.loss.pool_size, cfg.model.output_nc)} if cfg.loss.pool_size else {}


def _flip_where(flipped: Tensor, x: Tensor) -> Tensor:
    """``x`` flipped left-right where the device-side coin ``flipped`` (0-d bool) is true: no host
    read, one graph for both outcomes (CUDA graphs replay it with a fresh coin)."""
    return torch.where(flipped, x.flip(-1), x)


def patch_ids(run: StepRun, feats, num_patches: int, groups: int = 1, shared: bool = False) -> list[Tensor]:
    """Patch ids as :func:`~fastcgan.models.patchnce.sample_patch_ids` draws them with ``per_image=True``
    (``torch.rand`` + ``argsort`` on the device: no host sync, capturable), but for the *global* batch: ``feats``
    hold ``groups`` consecutive blocks of this process's images (``[A; B]``: 2); under DDP every
    process draws the keys of every process's images (identical seeds, identical draws) and keeps
    its own, so N processes sample what one process with the global batch samples. ``shared``: one
    draw per group for all its images, as the official (with negatives from the whole minibatch,
    the other images' patches at the same places are the negatives)."""
    dist = getattr(run, "dist", None)  # fastcgan.train.execution.Execution.dist
    world = dist.world_size if dist is not None and dist.enabled else 1
    ids = []
    for f in feats:
        rows, _, h, w = f.shape
        b, p = rows // groups, min(num_patches, h * w)
        if shared:  # the same draw on every process: nothing to shard
            one = torch.rand(groups, 1, h * w, device=f.device).argsort(dim=-1)[..., :p]
            ids.append(one.expand(groups, b, p).reshape(rows, p))
            continue
        keys = torch.rand(groups, b * world, h * w, device=f.device)
        if world > 1:
            keys = keys[:, dist.shard(b * world)]
        ids.append(keys.reshape(rows, h * w).argsort(dim=1)[:, :p])
    return ids


def forward_phase(run: StepRun, batch, carry: dict, cfg) -> tuple[None, dict, dict]:
    """G's forward, kept with its graph for the generator phase (no loss, no update here)."""
    real_A, real_B = batch["A"], batch["B"]
    lc = cfg.loss
    use_nce = lc.lambda_nce > 0
    # The official: G runs on [A; B] when nce_idt (the B half is the identity image).
    real = torch.cat([real_A, real_B]) if lc.nce_idt and use_nce else real_A
    layers = parse_nce_layers(cfg.model.nce_layers)
    G_step, G_plain = run.net("G"), run.frozen("G")
    out: dict = {"flipped": None, "keys": None}
    with run.autocast():
        x = real
        if lc.flip_equivariance:
            # The official draws one coin per step (np.random.random() < 0.5) on the host.
            out["flipped"] = torch.rand((), device=real.device) < 0.5
            x = _flip_where(out["flipped"], real)
        if use_nce and not lc.flip_equivariance and G_step is G_plain:
            # Keys from the forward itself: the input's features are intermediate tensors of G(x).
            fake, keys = G_plain.encode(x, layers, with_output=True)
            out["keys"] = [k.detach() for k in keys]
        else:
            fake = G_step(x)
            if use_nce:  # keys of the unflipped input (or: DDP's wrapper only runs forward)
                with torch.no_grad():
                    out["keys"] = G_plain.encode(real, layers)
    out["fake"] = fake
    return None, {}, out


def discriminator_forward(run: StepRun, batch, carry: dict, cfg) -> tuple[Tensor, dict, dict]:
    real_B = batch["B"]
    b = real_B.shape[0]
    D = run.net("D")
    mode = cfg.loss.gan_mode
    fake_B = carry["fake"][:b]
    fake_B = run.pool_query("pool_B", fake_B) if cfg.loss.pool_size else fake_B.detach()
    with run.autocast():
        if cfg.model.norm != "batch":
            pred_real, pred_fake = D(torch.cat([real_B, fake_B.to(real_B.dtype)])).split(b)
        else:
            pred_real, pred_fake = D(real_B), D(fake_B)
    losses = {"D_real": gan_loss(pred_real, True, mode), "D_fake": gan_loss(pred_fake, False, mode)}
    loss_D = (losses["D_real"] + losses["D_fake"]) * 0.5  # the official compute_D_loss
    losses["D"] = loss_D
    return loss_D, losses, carry


def generator_forward(run: StepRun, batch, carry: dict, cfg) -> tuple[Tensor, dict, dict]:
    """GAN + PatchNCE (+ NCE identity) into G and F; D frozen (its weights get no gradient)."""
    real_A = batch["A"]
    b = real_A.shape[0]
    lc = cfg.loss
    fake = carry["fake"]
    losses: dict[str, Tensor] = {}
    if lc.lambda_gan > 0:
        with run.autocast():
            pred_fake = run.frozen("D")(fake[:b])
        losses["G_GAN"] = generator_gan_loss(pred_fake, lc.gan_mode) * lc.lambda_gan
    else:
        losses["G_GAN"] = zero_loss(real_A)
    if lc.lambda_nce > 0:
        layers = parse_nce_layers(cfg.model.nce_layers)
        keys = carry["keys"]
        with run.autocast():
            # Queries: G's features of its own output, [fake_B; idt_B] in one encode (plain module:
            # under DDP its gradient joins the backward of the wrapper's forward).
            queries = run.frozen("G").encode(fake, layers)
            if carry["flipped"] is not None:
                queries = [_flip_where(carry["flipped"], f) for f in queries]
            # The same locations for a query and its key; one draw per image (no host sync), or per
            # batch when the negatives come from the whole batch (as the official).
            ids = patch_ids(run, keys, lc.num_patches, groups=2 if lc.nce_idt else 1,
                            shared=lc.nce_includes_all_negatives_from_minibatch)
            with torch.no_grad():  # keys: no graph (the loss detaches them, as the official)
                k = run.frozen("F")(gather_patches(keys, ids))
            q = run.net("F")(gather_patches(queries, ids))

        dist = getattr(run, "dist", None)  # fastcgan.train.execution.Execution.dist

        def nce(sl: slice) -> Tensor:
            ql, kl = [t[sl] for t in q], [t[sl] for t in k]
            if not lc.nce_includes_all_negatives_from_minibatch:
                return patch_nce_loss(ql, kl, lc.nce_T) * lc.lambda_nce
            # Negatives from every image of the (global) batch: under DDP each process's queries
            # meet the keys of every process (keys carry no gradient: a plain all-gather), its own
            # at its rank's offset; DDP's gradient average then equals one process's global mean.
            ql = [t.reshape(1, -1, t.shape[-1]) for t in ql]
            offsets = [0] * len(ql)
            if dist is not None and dist.enabled:
                offsets = [dist.rank * t.shape[1] for t in ql]  # its images' patches, in each layer
                kl = [dist.all_gather_batch(t) for t in kl]
            kl = [t.reshape(1, -1, t.shape[-1]) for t in kl]
            return patch_nce_loss(ql, kl, lc.nce_T, key_offset=offsets) * lc.lambda_nce

        losses["NCE"] = nce(slice(0, b))
        if lc.nce_idt:
            losses["NCE_Y"] = nce(slice(b, 2 * b))
            loss_nce = (losses["NCE"] + losses["NCE_Y"]) * 0.5
        else:
            loss_nce = losses["NCE"]
    else:
        losses["NCE"] = zero_loss(real_A)
        if lc.nce_idt:
            losses["NCE_Y"] = zero_loss(real_A)
        loss_nce = losses["NCE"]
    loss_G = losses["G_GAN"] + loss_nce
    losses["G"] = loss_G
    return loss_G, losses, carry


def sample_rows(run: StepRun, images: dict[str, Tensor]) -> list[list[Tensor]]:
    """One row per image pair: input A | G(A) | B | G(B). For CUT, G(B) is the NCE-identity image
    (it should look like B); FastCUT does not train it, and the column shows what G does to an
    image that is already in B (left out when B's channels are not G's input channels)."""
    G = run.frozen("G")
    cols = [images["A"], G.forward(images["A"]), images["B"]]
    if images["B"].shape[1] == images["A"].shape[1]:
        cols.append(G.forward(images["B"]))
    return [list(t) for t in zip(*cols)]


RECIPE = Recipe(
    name="cut",
    networks=networks,
    optimizers={"G": ("G", "F"), "D": ("D",)},
    pools=pools,
    phases=(
        Phase("forward", None, forward_phase),
        Phase("discriminator", "D", discriminator_forward),
        Phase("generator", "G", generator_forward, frozen=("D",)),
    ),
    loss_names=loss_names,
    sample_rows=sample_rows,
    exports={"AtoB": "G"},
    progress_keys=("G", "G_GAN", "NCE", "D"),
    official_networks={"G": "G", "D": "D", "F": "F"},  # F: the PatchNCE heads (--netF mlp_sample)
    lr_update_at_epoch_start=False,  # its train.py steps the schedules after each epoch
    no_zoom_when_decaying=True,  # its dataset: load_size = crop_size once epoch > n_epochs
    reversible=True,  # --direction BtoA: B images are the input (the official cityscapes labels -> photos)
)
