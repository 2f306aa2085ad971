"""The colour-cast attempt (explain.search.cast): one colour transformation of the whole image."""

import math
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from pipeline import cast, explain, manifest
from pipeline.config import GeneratorConfig
from pipeline.counterfactual import Explainer, PixelCodec, Settings
from tests.test_explain import _config


class CastMeter(torch.nn.Module):
    """Reads only the image's colour balance (mean red against mean blue): a scanner-cast shortcut."""

    def forward(self, x):
        warm = 8 * (x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2)))
        return torch.stack([-warm, warm], 1)


def _cool_tiles(n=4, side=24):
    """Textured tiles with a cool cast (blue above red), mid-range so no channel is clipped."""
    texture = 0.3 * torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(0))
    return (texture + torch.tensor([-0.3, -0.1, 0.1]).view(1, 3, 1, 1)).clamp(-1, 1)


def test_the_transformation_is_a_gain_per_channel_on_intensities():
    x = _cool_tiles(2)
    torch.testing.assert_close(cast.transformed(x, cast.identity(2)), x)
    params = torch.tensor([[math.log(1.5), 0.0, math.log(0.5)]]).repeat(2, 1)
    out = (cast.transformed(x, params) + 1) / 2
    torch.testing.assert_close(out[:, 0], 1.5 * (x[:, 0] + 1) / 2)
    torch.testing.assert_close(out[:, 1], (x[:, 1] + 1) / 2)
    torch.testing.assert_close(out[:, 2], 0.5 * (x[:, 2] + 1) / 2)


def test_a_cast_classifier_is_explained_by_a_colour_change_of_the_whole_image():
    x, target = _cool_tiles(), torch.ones(4, dtype=torch.long)
    settings = Settings(attempts=1, goal=0.9, steps=150, lr=0.05, l1=0.1, cast=True, cast_lr=0.02)
    results = Explainer(PixelCodec(), CastMeter(), settings)(x, target)
    assert len(results) == 2  # the latent attempt, then the cast
    colour = results[1]
    assert colour["success"].all() and (colour["p_after"] >= 0.9).all()
    assert colour["mask"].flatten(1).mean(1).min() > 0.99  # every pixel moved: the edit is global
    # the same gain on every pixel of a channel: the counterfactual is the original under one transformation
    gain = (colour["x_cf"] + 1) / (x + 1)
    spread = gain.flatten(2).std(2) / gain.flatten(2).mean(2)
    assert spread.max() < 1e-3
    assert (gain[:, 0].mean((1, 2)) > 1).all() and (gain[:, 2].mean((1, 2)) < 1).all()  # warmer
    # the start's judgement, a forward and a backward pass per step (the step's logits judge it)
    assert torch.equal(colour["evaluations"], 1 + 2 * colour["steps"])
    shrunk = Explainer(PixelCodec(), CastMeter(), replace(settings, cast_shrink=True))(x, target)[1]
    # explain.search.cast_shrink: then the shrink's judgements too
    assert torch.equal(shrunk["evaluations"], 1 + 2 * shrunk["steps"] + cast.SHRINK_HALVINGS)
    assert (colour["steps"] > 0).all() and colour["seconds"] > 0 and not colour["no_room"].any()


def _warmth_odds(x):
    return CastMeter()(x).diff(dim=1).squeeze(1)  # log-odds of class 1 (warm) against class 0


def test_a_long_step_past_the_level_is_shrunk_back_to_the_least_cast_that_reaches_it():
    x, target = _cool_tiles(), torch.ones(4, dtype=torch.long)
    settings = Settings(attempts=1, goal=0.9, steps=150, lr=0.05, l1=0.1, cast=True, cast_lr=0.5)
    need = math.log(0.9 / 0.1)  # the level's log-odds
    shrunk = Explainer(PixelCodec(), CastMeter(), replace(settings, cast_shrink=True))(x, target)[1]
    unshrunk = Explainer(PixelCodec(), CastMeter(), settings)(x, target)[1]
    assert torch.equal(shrunk["steps"], unshrunk["steps"])  # the same search; only its last edit differs
    long, short = _warmth_odds(unshrunk["x_cf"]), _warmth_odds(shrunk["x_cf"])
    assert (long > need + 1).all()  # steps of 0.5 in log gain carry the cast far past the level
    # scaled back close to the level
    assert (short >= need).all() and (short < need + 0.2 * (long - need)).all()
    assert shrunk["success"].all() and (shrunk["p_after"] >= 0.9).all()
    assert (shrunk["x_cf"] - x).abs().sum() < (unshrunk["x_cf"] - x).abs().sum()
    # still one transformation of the whole image: the same gain on every pixel of a channel
    gain = (shrunk["x_cf"] + 1) / (x + 1)
    assert (gain.flatten(2).std(2) / gain.flatten(2).mean(2)).max() < 1e-3


def test_a_cast_that_never_reached_its_level_is_not_shrunk():
    x, target = _cool_tiles(), torch.ones(4, dtype=torch.long)
    settings = Settings(
        attempts=1, goal=0.9, steps=2, lr=0.05, l1=0.1, cast=True, cast_lr=0.01, cast_shrink=True
    )
    colour = Explainer(PixelCodec(), CastMeter(), settings)(x, target)[1]
    assert not colour["success"].any()  # two short steps do not get there
    assert torch.equal(colour["evaluations"], 1 + 2 * colour["steps"])  # no shrink judged
    assert (_warmth_odds(colour["x_cf"]) > _warmth_odds(x)).all()  # the best iterate kept, not scaled back


def test_without_the_switch_there_is_no_cast_attempt():
    x, target = _cool_tiles(), torch.ones(4, dtype=torch.long)
    settings = Settings(attempts=1, goal=0.9, steps=5, lr=0.05, l1=0.1, cast=False)
    assert len(Explainer(PixelCodec(), CastMeter(), settings)(x, target)) == 1


def test_the_explain_stage_writes_the_cast_as_the_last_attempt(tiny_biased, tiny_codec, tmp_path):
    ckpt, data = tiny_biased
    summary = explain.run(ckpt, data, _config(cast=True), GeneratorConfig(source=str(tiny_codec)), tmp_path)
    table = manifest.read(tmp_path / "manifest.csv")
    assert len(table) == 2 * 3 * 3 and set(table["attempt"]) == {1, 2, 3}  # pairs x images x (2 + cast)
    # a flip by a whole-image change: every pixel not near black moved (a gain barely moves black)
    for row in table[(table["attempt"] == 3) & table["success"]].itertuples():
        original, edit = (
            np.asarray(Image.open(tmp_path / p), float) for p in (row.original, row.counterfactual)
        )
        lit = original.max(2) > 60
        assert (edit != original).any(2)[lit].mean() > 0.9
    assert set(summary["validity_by_attempt"]) == {1, 2, 3}


class GreenAndCastMeter(torch.nn.Module):
    """Reads the colour balance and, as strongly, how little green there is: a classifier the cheapest gain flips
    partly through a colour no real image has."""

    def forward(self, x):
        warm = 8 * (x[:, 0].mean((1, 2)) - x[:, 2].mean((1, 2)) - x[:, 1].mean((1, 2)))
        return torch.stack([-warm, warm], 1)


def _casts(n=16):
    """Real tiles whose overall colour varies only along red against blue (two scanners' casts)."""
    log_gain = torch.linspace(-0.2, 0.2, n).view(n, 1, 1, 1) * torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)
    return cast.transformed(_cool_tiles(n), log_gain[:, :, 0, 0])


def test_the_colour_basis_follows_the_real_images_colour_variation():
    basis = cast.colour_basis(_casts())
    axis = torch.tensor([1.0, 0.0, -1.0]) / math.sqrt(2)
    torch.testing.assert_close(basis @ axis, axis, atol=0.05, rtol=0)  # the main direction keeps unit length
    assert (basis @ torch.tensor([0.0, 1.0, 0.0])).norm() < 0.05  # no real image's green varies


def test_the_cast_moves_along_the_real_images_colour_variation_only():
    x, target = _cool_tiles(), torch.ones(4, dtype=torch.long)
    settings = Settings(attempts=1, goal=0.9, steps=150, lr=0.05, l1=0.1, cast=True, cast_lr=0.02)

    def log_gains(colours):
        result = Explainer(PixelCodec(), GreenAndCastMeter(), settings, colours=colours)(x, target)[1]
        assert result["success"].all()
        return ((result["x_cf"] + 1) / (x + 1)).log().mean((2, 3))

    free, real = log_gains(None), log_gains(cast.colour_basis(_casts()))
    assert (free[:, 1].abs() > 0.3 * free[:, 0].abs()).all()  # unconstrained, green falls with blue
    assert (real[:, 1].abs() < 0.1 * real[:, 0].abs()).all()  # along the casts alone: green stays
    assert (real[:, 0] > 0).all() and (real[:, 2] < 0).all()  # warmer


class CornerMeter(torch.nn.Module):
    """Reads only the colour balance of a 6 x 6 corner patch: a local tag, which a cast of the whole image also
    moves, at the price of every other pixel."""

    def forward(self, x):
        corner = x[:, :, :6, :6]
        warm = 8 * (corner[:, 0].mean((1, 2)) - corner[:, 2].mean((1, 2)))
        return torch.stack([-warm, warm], 1)


def test_a_competing_cast_is_attempt_1_only_where_it_is_the_smaller_edit():
    x, target = _cool_tiles(), torch.ones(4, dtype=torch.long)
    settings = Settings(
        attempts=2, goal=0.9, steps=150, lr=0.05, l1=0.1, cast=False, cast_competes=True, cast_lr=0.02
    )
    on_cast = Explainer(PixelCodec(), CastMeter(), settings)(x, target)
    assert len(on_cast) == 2  # no attempt of its own: the cast competes within attempt 1
    first = on_cast[0]
    assert first["success"].all() and first["mask"].flatten(1).mean(1).min() > 0.99  # the cast won
    gain = (first["x_cf"] + 1) / (x + 1)
    assert (gain.flatten(2).std(2) / gain.flatten(2).mean(2)).max() < 1e-3  # one gain per channel
    assert on_cast[1]["no_room"].all()  # a cast moves every pixel: nothing is left for attempt 2
    on_corner = Explainer(PixelCodec(), CornerMeter(), settings)(x, target)[0]
    assert on_corner["success"].all()
    moved = on_corner["mask"][:, 0]
    assert moved.flatten(1).mean(1).max() < 0.5  # a local edit won: a cast would move every pixel
    assert moved[:, :6, :6].mean() > moved[:, 12:, 12:].mean()  # ... and it sits on the corner
    alone = Explainer(PixelCodec(), CornerMeter(), replace(settings, cast_competes=False))(x, target)[0]
    assert (on_corner["evaluations"] > alone["evaluations"]).all()  # both searches are paid for


def test_the_explain_stage_with_a_competing_cast_writes_no_attempt_of_its_own(
    tiny_biased, tiny_codec, tmp_path
):
    """Attempt 1 keeps the local edit wherever it is the smaller valid edit, a cast wins only where it is smaller,
    and the cast search is paid for on every image."""
    ckpt, data = tiny_biased
    runs = {}
    for competes in (False, True):
        out = tmp_path / str(competes)
        explain.run(
            ckpt,
            data,
            _config(cast=False, cast_competes=competes),
            GeneratorConfig(source=str(tiny_codec)),
            out,
        )
        runs[competes] = manifest.read(out / "manifest.csv").set_index("id").sort_index()
    table, plain = runs[True], runs[False]
    assert len(table) == 2 * 3 * 2 and set(table["attempt"]) == {1, 2}  # pairs x images x 2 attempts
    first = (table["attempt"] == 1).to_numpy()
    cast_won = first & (table["changed_area"] >= 0.99).to_numpy()  # a cast moves every pixel
    pair = (table["sample"] + "/" + table["target_class"].astype(str)).to_numpy()
    local = ~np.isin(pair, pair[cast_won])
    assert local[first].mean() >= 0.5  # on Square the local edit is mostly the smaller one
    # where the local edit won, both attempts are the very edits of the run without the cast ...
    np.testing.assert_allclose(table["l1"].to_numpy()[local], plain["l1"].to_numpy()[local])
    # ... and where a cast won, the local edit had not flipped or was larger
    beaten = plain["success"].to_numpy() & cast_won
    assert (table["l1"].to_numpy()[beaten] <= plain["l1"].to_numpy()[beaten]).all()
    # the cast search paid for on every image
    assert (table["evaluations"].to_numpy()[first] > plain["evaluations"].to_numpy()[first]).all()
