import torch

from pipeline import generator, models
from pipeline.counterfactual import Explainer, Settings
from pipeline.data import ImageDataset, load_folder, make_transform
from pipeline.patchprior import PatchPrior


def _images(root, split):
    images = ImageDataset(load_folder(root), split, ["0", "1"], make_transform(32))
    return torch.stack([images[i][0] for i in range(len(images))])


def test_patch_prior_prefers_real_looking_edits(square_dir):
    train, val = _images(square_dir, "train"), _images(square_dir, "val")
    prior = PatchPrior.fit(train, components=8, samples=5000)
    nll = lambda x: prior(x).mean().item()  # noqa: E731
    # held-out real images are about as likely as the training images; pure colour noise is not
    assert abs(nll(val) - nll(train)) < 0.1
    assert nll(torch.rand_like(val) * 2 - 1) > nll(val) + 1.0
    # same L1 budget: brighter grey (what real images vary by) vs a red tint (what no Square image has)
    brighter = (val + 0.15).clamp(-1, 1)
    tinted = val.clone()
    tinted[:, 0] = (tinted[:, 0] + 0.45).clamp(-1, 1)
    assert nll(tinted) - nll(val) > 3 * (nll(brighter) - nll(val))


def _search_setup(tiny_biased, tiny_codec):
    """The biased tiny classifier, the tiny codec, a prior fitted on its training images, 24 validation images
    and the opposite of the classifier's prediction for each as the target."""
    ckpt, data = tiny_biased
    model, _ = models.load(ckpt)
    x = _images(data.root, "val")[:24]
    with torch.no_grad():
        target = 1 - model(x).argmax(1)
    prior = PatchPrior.fit(_images(data.root, "train"), components=8, samples=5000)
    return model, generator.load(str(tiny_codec)), prior, x, target


def test_explainer_with_the_prior_keeps_counterfactual_patches_likely(tiny_biased, tiny_codec):
    model, codec, prior, x, target = _search_setup(tiny_biased, tiny_codec)
    cost, results = {}, {}
    for weight in (0.0, 1.0):
        settings = Settings(attempts=1, goal=0.7, steps=60, lr=0.1, l1=0.1, patch_prior=weight)
        explainer = Explainer(codec, model, settings, prior=prior)
        assert (explainer.prior is None) == (weight == 0)
        results[weight] = explainer(x, target, seed=0)[0]
    ok = results[0.0]["success"] & results[1.0]["success"]  # compare flips with flips
    assert ok.sum() >= 3
    with torch.no_grad():
        for weight, result in results.items():
            cost[weight] = (prior(result["x_cf"][ok]) - prior(x[ok])).mean().item()
    assert cost[1.0] < 0.5 * cost[0.0], cost


def test_tiles_round_trip_any_size():
    from pipeline.patchprior import tiles, untile

    x = torch.randn(2, 3, 30, 37)
    p = tiles(x, 4)
    assert p.shape == (2, 8 * 10, 48)
    assert torch.equal(untile(p, 4, 30, 37), x)


def test_projection_keeps_brightness_and_removes_tint(square_dir):
    train, val = _images(square_dir, "train"), _images(square_dir, "val")[:16]
    prior = PatchPrior.fit(train, components=8, samples=5000)
    assignment = prior.assign(val)
    grey = torch.full_like(val, 0.3)
    red = torch.zeros_like(val)
    red[:, 0] = 0.3
    kept = prior.project(grey, assignment)
    # a uniform brightness change is what background patches vary by: it survives almost whole ...
    assert (kept - grey).abs().mean() < 0.1 * grey.abs().mean()
    # ... while the red part of a tint does not: what survives is (mostly) grey
    tint = prior.project(red, assignment)
    spread = (tint[:, 0] - tint[:, 1:].mean(1)).abs().mean()
    assert spread < 0.35 * 0.3, spread
    # a projector is idempotent: projecting twice changes nothing
    assert torch.allclose(prior.project(tint, assignment), tint, atol=1e-5)
    # every tile goes through its own component's projector (tiles grouped by component for speed)
    from pipeline.patchprior import tiles

    expected = torch.einsum("bld,blde->ble", tiles(red, 4), prior.projectors[assignment])
    assert torch.allclose(tiles(tint, 4), expected, atol=1e-5)


def test_explainer_with_projection_edits_the_background_in_grey(tiny_biased, tiny_codec):
    model, codec, prior, x, target = _search_setup(tiny_biased, tiny_codec)
    tint = {}
    for project in (False, True):
        settings = Settings(attempts=1, goal=0.7, steps=60, lr=0.1, l1=0.1, project=project)
        result = Explainer(codec, model, settings, prior=prior)(x, target, seed=0)[0]
        assert result["success"].float().mean() >= 0.5, project
        d = (result["x_cf"] - x)[result["success"]]
        # colour spread of the change: how far its channels move apart (0 for a pure brightness change)
        tint[project] = (d - d.mean(1, keepdim=True)).abs().mean().item() / d.abs().mean().item()
    assert tint[True] < 0.5 * tint[False], tint
