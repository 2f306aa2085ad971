import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.errors import UserError


def test_defaults_and_round_trip(tmp_path):
    assert config.RunConfig().classifier.arch == "resnet18"  # what a user's config gets when it names none
    default = config.load(None)  # the embedded default run
    assert default.classifier.arch == "small_cnn" and default.data.square.poison == 1.0
    config.dump(default, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == default


def test_every_problem_is_reported_once(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "name: x\nclassifer: {}\ndata:\n  square: {poison: 1.5, n: ten}\nclassifier: {epochs: 0, lr: -1}\n"
    )
    with pytest.raises(UserError) as err:
        config.load(tmp_path / "c.yaml")
    message = str(err.value)
    assert "classifer: unknown key" in message
    assert "data.square.poison: got 1.5, expected a number in [0, 1]" in message
    assert "data.square.n: got 'ten', expected int" in message
    assert "classifier.epochs: got 0" in message and "classifier.lr: got -1" in message


def test_a_retired_setting_loads_when_off_and_is_named_when_on(tmp_path):
    """A run directory written before distil.transplant went still loads (its value was the off value: the same
    method); a config that turns it on gets one line naming the key and why, not a silent other method."""
    old = config.to_dict(config.RunConfig())
    old["distil"]["transplant"] = 0.0
    assert config.from_dict(old) == config.RunConfig()
    old["distil"]["transplant"] = 0.5
    with pytest.raises(UserError, match=r"distil.transplant: removed \(a verdict is only ever used"):
        config.from_dict(old)


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="name: got '../x'"):
        config.from_dict({"name": "../x"})


def test_fingerprint_tracks_config():
    a, b = config.RunConfig(), config.from_dict({"classifier": {"epochs": 2}})
    assert config.fingerprint(a.classifier) != config.fingerprint(b.classifier)
    assert config.fingerprint(a.data) == config.fingerprint(b.data)


def test_cfkd_sections_are_checked():
    with pytest.raises(UserError) as err:
        config.from_dict(
            {
                "feedback": {"teacher": "oracle", "band": 0.5, "partial": 0},
                "distil": {
                    "mix": 1.0,
                    "precision": "fp8",
                    "layers": "conv",
                    "keep": "first",
                    "stretch": 0.5,
                    "flip": "up",
                    "shift": 0.5,
                    "originals": "teacher",
                    "erase_finetuned": "no",
                    "stretch_within": "yes",
                },
                "baseline": {"dfr": 1},
            }
        )
    message = str(err.value)
    assert "feedback.teacher: got 'oracle', expected mask, model or human" in message
    assert "distil.mix: got 1.0" in message and "distil.precision: got 'fp8'" in message
    assert "distil.layers: got 'conv', expected all, head, none or staged" in message
    assert "distil.keep: got 'first', expected best or last" in message
    assert "feedback.band: got 0.5, expected a number >= 1" in message
    assert "feedback.partial: got 0, expected a share in (0, 1]" in message
    assert "distil.stretch: got 0.5, expected a number in [1, 10]" in message
    assert "distil.flip: got 'up', expected none, horizontal or both" in message
    assert "distil.shift: got 0.5, expected a share in [0, 0.5)" in message
    assert "distil.originals: got 'teacher', expected labels or explained" in message
    assert "distil.erase_finetuned: got 'no', expected bool" in message
    assert "distil.stretch_within: got 'yes', expected bool" in message
    assert "baseline.dfr: got 1, expected bool" in message
    with pytest.raises(UserError, match="distil.layers: none fine-tunes nothing; it needs distil.erase >= 1"):
        config.from_dict({"distil": {"layers": "none", "erase": 0}})
    with pytest.raises(
        UserError, match="distil.layers: staged erases alone in round 1; .* set distil.layers: all"
    ):
        config.from_dict({"distil": {"erase": 0}})  # the default layers need the erase
    with pytest.raises(UserError, match="distil.erase_finetuned: false with distil.layers: all never erases"):
        config.from_dict({"distil": {"layers": "all", "erase_finetuned": False}})
    # the recommended erase searches its rank and keeps it; another erase value alone is valid (nothing to keep)
    assert (config.RunConfig().distil.erase, config.RunConfig().distil.erase_ranks) == ("verdicts", True)
    assert config.from_dict({"distil": {"erase": 1}}).distil.erase_ranks
    # the vote is on by default: turning the cast off alone is valid (there are no casts to vote on)
    assert config.from_dict({"explain": {"search": {"cast": False}}}).distil.cast_vote
    with pytest.raises(UserError, match=r"explain.search.pace \(0.8\) is above feedback.partial \(0.5\)"):
        config.from_dict({"explain": {"search": {"pace": 0.8}}})
    with pytest.raises(UserError, match=r"explain.search.pace: got 1.5, expected a share in \[0, 1\]"):
        config.from_dict({"explain": {"search": {"pace": 1.5}}, "feedback": {"partial": 1.0}})
    assert config.from_dict({"explain": {"search": {"pace": 1.0}}, "feedback": {"partial": 1.0}})
    assert not config.from_dict(
        {"distil": {"erase_finetuned": False}}
    ).distil.erase_finetuned  # staged erases
    assert config.from_dict({"distil": {"erase": "hold"}}).distil.erase == "hold"
    assert config.from_dict({"distil": {"erase": "verdicts"}}).distil.erase == "verdicts"
    with pytest.raises(
        UserError, match=r"distil.erase: got 'most', expected auto, hold, verdicts or an integer"
    ):
        config.from_dict({"distil": {"erase": "most"}})
    # with nothing erased the vote has nothing to decide: no error
    plain = config.from_dict({"distil": {"layers": "all", "erase": 0}}).distil
    assert plain.erase_vote and plain.erase == 0
    for bad in (-1, "all"):
        with pytest.raises(
            UserError, match=f"distil.erase: got {bad!r}, expected auto, hold, verdicts or an integer in"
        ):
            config.from_dict({"distil": {"erase": bad}})
    assert config.from_dict({"distil": {"erase": "auto"}}).distil.erase == "auto"
    assert config.from_dict({"distil": {"layers": "none", "erase": 2}}).distil.erase == 2
    default = config.load(None)
    assert default.distil.rounds == 3 and default.feedback.teacher == "mask" and default.baseline.dfr


def test_search_confinement_keys_are_checked(tmp_path):
    with pytest.raises(UserError) as err:
        config.from_dict(
            {"explain": {"search": {"confine": "segments", "max_regions": 12, "aim": 0.3, "tv": -1}}}
        )
    message = str(err.value)
    assert "explain.search.confine: got 'segments', expected threshold or regions" in message
    assert "explain.search.max_regions: got 12" in message and "explain.search.aim: got 0.3" in message
    assert "explain.search.tv: got -1, expected a number >= 0" in message
    variant = config.load(Path(__file__).parents[1] / "benchmarks" / "configs" / "regions.yaml")
    assert variant.explain.search.confine == "regions" and variant.explain.search.aim == 0.99


def test_every_yaml_block_of_the_readme_is_a_config_that_loads(tmp_path):
    """The README's YAML is what users copy: each block must load as written, and the mask teacher's colour-cast
    settings must set what the text says they set."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    assert len(blocks) >= 3
    loaded = []
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.yaml").write_text(block)
        loaded.append(config.load(tmp_path / f"{i}.yaml"))
    cast = [c for c in loaded if c.feedback.oracle == "density+intervention"]
    assert len(cast) == 1
    # the two settings the text names, and everything else the recommended method (the cast attempt included)
    d = config.RunConfig()
    assert d.explain.search.cast and d.distil.cast_vote
    expected = replace(
        d,
        distil=replace(d.distil, stretch_within=True),
        feedback=replace(d.feedback, oracle="density+intervention"),
    )
    assert cast[0] == expected


def test_the_readme_config_reference_gives_the_dataclass_defaults():
    """Each row of the README's configuration reference (`| \\`section.key\\` | default | ... |`) names a setting
    that exists and gives its library default, so the document cannot drift from the method it describes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)+)` \| ([^|]*) \|", readme, flags=re.M)
    assert len(rows) >= 50
    defaults = config.to_dict(config.RunConfig())
    wrong = []
    for key, cell in rows:
        node = defaults
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        written = re.sub(r"\s*\(demo: [^)]*\)$", "", cell.strip()).strip("`")
        if node is KeyError or yaml.safe_load(written) != node:
            wrong.append(
                f"{key}: README {cell.strip()!r}, library {'no such key' if node is KeyError else node!r}"
            )
    assert not wrong, "\n".join(wrong)
