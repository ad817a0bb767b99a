import pytest
import torch

from fastcgan.image_pool import ImagePool


def sequential_reference(pool_list, num, pool_size, images, swap, rid):
    """The official per-image loop, fed the same random draws as the tensorised pool."""
    out = []
    for i, img in enumerate(images):
        if num < pool_size:
            pool_list.append(img.clone())
            num += 1
            out.append(img)
        elif swap[i]:
            r = int(rid[i])
            out.append(pool_list[r].clone())
            pool_list[r] = img.clone()
        else:
            out.append(img)
    return torch.stack(out), num


@pytest.mark.parametrize("pool_size,batch", [(5, 1), (5, 2), (4, 3), (3, 7), (50, 4)])
def test_matches_sequential_official_loop(pool_size, batch):
    """Exact equality with the official image-by-image loop given the same draws, across the
    fill phase, a batch straddling the fill boundary, and in-batch slot collisions."""
    seed = 1000
    pool = ImagePool(pool_size, generator=torch.Generator().manual_seed(seed))
    ref_pool, ref_num = [], 0
    g_ref = torch.Generator().manual_seed(seed)
    counter = 0
    for _ in range(3 * pool_size // batch + 6):
        imgs = (
            torch.full((batch, 2, 3, 2), 0.0)
            + torch.arange(counter, counter + batch).view(-1, 1, 1, 1).float()
        )
        counter += batch
        swap = torch.rand(batch, generator=g_ref) > 0.5
        rid = torch.randint(0, pool_size, (batch,), generator=g_ref)
        expect, ref_num = sequential_reference(ref_pool, ref_num, pool_size, imgs, swap, rid)
        got = pool.query(imgs)
        torch.testing.assert_close(got, expect, rtol=0, atol=0)
        assert int(pool.num_imgs) == ref_num
        torch.testing.assert_close(pool.images[:ref_num], torch.stack(ref_pool), rtol=0, atol=0)


def test_fill_phase_returns_inputs_and_stores_them():
    pool = ImagePool(6)
    a = torch.randn(4, 3, 5, 7)
    torch.testing.assert_close(pool.query(a), a, rtol=0, atol=0)
    assert int(pool.num_imgs) == 4
    torch.testing.assert_close(pool.images[:4], a, rtol=0, atol=0)
    b = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(pool.query(b), b, rtol=0, atol=0)
    assert int(pool.num_imgs) == 6
    assert pool.images.shape == (6, 3, 5, 7) and pool.images.dtype == a.dtype


def test_full_phase_statistics_and_old_images_were_stored():
    torch.manual_seed(0)
    pool_size, batch, steps = 10, 4, 400
    pool = ImagePool(pool_size)
    seen = set()
    swaps = total = 0
    for step in range(steps):
        ids = torch.arange(step * batch, (step + 1) * batch, dtype=torch.float32)
        imgs = ids.view(-1, 1, 1, 1).expand(batch, 1, 2, 2).clone()
        out = pool.query(imgs)
        out_ids = out[:, 0, 0, 0]
        assert torch.all(out == out_ids.view(-1, 1, 1, 1))  # whole images, never mixed
        for i, v in enumerate(out_ids.tolist()):
            # Its own image, or one stored before it (earlier queries or earlier in this batch).
            assert v in seen or v in ids[: i + 1].tolist()
            if step * batch >= pool_size:  # full phase
                total += 1
                if v != ids[i].item():
                    swaps += 1
                    assert v < ids[i].item()  # an older image that had been stored
        seen.update(ids.tolist())
    frac = swaps / total
    assert 0.45 < frac < 0.55, frac  # binomial(1600, 0.5): sd 0.0125
    # The pool holds distinct, previously queried images.
    stored = pool.images[:, 0, 0, 0].tolist()
    assert len(set(stored)) == pool_size and set(stored) <= seen


def test_pool_size_zero_is_passthrough():
    pool = ImagePool(0)
    x = torch.randn(3, 3, 4, 4, requires_grad=True)
    y = pool.query(x)
    torch.testing.assert_close(y, x.detach(), rtol=0, atol=0)
    assert not y.requires_grad and pool.images is None


def test_state_dict_round_trip_and_lazy_load():
    torch.manual_seed(1)
    pool = ImagePool(5)
    for _ in range(4):
        pool.query(torch.randn(2, 3, 4, 6))
    sd = pool.state_dict()
    assert set(sd) == {"images", "num_imgs"}
    fresh = ImagePool(5)  # buffer not yet allocated
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh.images, pool.images, rtol=0, atol=0)
    assert int(fresh.num_imgs) == 5
    torch.manual_seed(7)
    a = pool.query(torch.ones(3, 3, 4, 6))
    torch.manual_seed(7)
    b = fresh.query(torch.ones(3, 3, 4, 6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # An unused pool saves no image buffer and loads into an unused pool.
    empty = ImagePool(5).state_dict()
    assert set(empty) == {"num_imgs"}
    ImagePool(5).load_state_dict(empty)


def test_shape_mismatch_and_bad_size():
    pool = ImagePool(3)
    pool.query(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="do not match"):
        pool.query(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="move the pool"):
        pool.query(torch.zeros(1, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="pool_size"):
        ImagePool(-1)


def test_dtype_kept():
    pool = ImagePool(4)
    x = torch.randn(3, 3, 4, 4).to(torch.bfloat16)
    assert pool.query(x).dtype == torch.bfloat16 and pool.images.dtype == torch.bfloat16


def test_compiles_fullgraph_without_host_sync():
    torch.manual_seed(0)
    torch._dynamo.reset()
    pool = ImagePool(4)
    pool.allocate(torch.zeros(1, 3, 4, 4))
    q = torch.compile(pool.query, fullgraph=True, backend="aot_eager")
    outs = []
    for step in range(5):
        x = torch.full((3, 3, 4, 4), float(step))
        outs.append(q(x))
    assert int(pool.num_imgs) == 4
    # Fill phase: the first batch comes back unchanged.
    torch.testing.assert_close(outs[0], torch.zeros(3, 3, 4, 4), rtol=0, atol=0)
    stored = set(pool.images[:, 0, 0, 0].tolist())
    assert stored <= {0.0, 1.0, 2.0, 3.0, 4.0}


@pytest.mark.cuda
def test_cuda_query_never_synchronises():
    pool = ImagePool(5)
    x = torch.randn(3, 3, 16, 16, device="cuda")
    pool.query(x)  # allocation happens here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            out = pool.query(torch.randn(3, 3, 16, 16, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and int(pool.num_imgs) == 5


def test_query_returns_the_dtype_it_was_given_not_the_pools():
    """A pool allocated (or restored) in fp32 and queried with bf16 fakes (a run resumed with
    --amp) returns bf16, as it was given."""
    pool = ImagePool(2, generator=torch.Generator().manual_seed(0))
    pool.query(torch.randn(2, 3, 4, 4))  # fills the fp32 pool
    for _ in range(3):
        out = pool.query(torch.randn(3, 3, 4, 4, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
    assert pool.images.dtype == torch.float32
