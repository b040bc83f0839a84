"""An image and its JSON sidecar are one unit (issue 33, defect 6): both names are claimed or neither, a user's
NAME.json is never replaced, and the pair moves on together; and the run's smaller flags refuse in one line what
they would otherwise ignore (no model, no torch)."""

import json

import numpy as np
import pytest
from PIL import Image

from mlx_glm_image import atomic, runs
from mlx_glm_image.generate import build_parser, plan, write_image
from mlx_glm_image.pipeline.preview import preview_steps

RECORD = {"prompt": "x", "width": 8, "height": 8, "steps": 1, "guidance": 1, "seed": 1, "model": "m"}


def event(color="red"):
    return type("E", (), {"image": Image.new("RGB", (8, 8), color), "metadata": RECORD})


def planned(*argv):
    return plan(build_parser().parse_args(list(argv)))


def test_the_plan_moves_a_pair_past_a_users_json(tmp_path):
    """Before: only a.png was looked at, so the run planned a.png and replaced the user's a.json."""
    (tmp_path / "a.json").write_text("mine")
    images = [{"seed": 1, "prompt": "x"}]
    (path, asked), = runs.output_paths(str(tmp_path / "a.png"), images, False, sidecar=True)
    assert (path, asked) == (tmp_path / "a-2.png", tmp_path / "a.png")
    assert runs.existing(asked, sidecar=True) == tmp_path / "a.json"
    (path, asked), = runs.output_paths(str(tmp_path / "a.png"), images, False)
    assert (path, asked) == (tmp_path / "a.png", None), "without --metadata the JSON is not the run's"


def test_a_json_that_appears_after_planning_moves_the_pair_on(tmp_path, capsys):
    """The claim itself: a.png is free, a.json appeared (the user's): the pair goes to a-2, the JSON is kept."""
    (tmp_path / "a.json").write_text("mine")
    written = []
    path = write_image(event(), tmp_path / "a.png", tmp_path / "a.png", {"metadata": True}, written.append)
    assert path == tmp_path / "a-2.png" and written == [path]
    assert (tmp_path / "a.json").read_text() == "mine" and not (tmp_path / "a.png").exists()
    assert json.loads((tmp_path / "a-2.json").read_text()) == RECORD
    assert json.loads(Image.open(path).text["glm-image"]) == RECORD
    assert f"{tmp_path / 'a.json'} exists now: writing {tmp_path / 'a-2.png'}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-2.json", "a-2.png", "a.json"]


def test_overwrite_replaces_both(tmp_path):
    for name in ("a.png", "a.json"):
        (tmp_path / name).write_text("old")
    assert write_image(event(), tmp_path / "a.png", tmp_path / "a.png", {"metadata": True, "overwrite": True}) \
        == tmp_path / "a.png"
    assert json.loads((tmp_path / "a.json").read_text()) == RECORD
    assert np.asarray(Image.open(tmp_path / "a.png"))[0, 0, 0] == 255


def test_a_pair_is_claimed_whole_or_not_at_all(tmp_path):
    """The second name exists: the first, claimed a moment before, is given back; no temporary stays."""
    (tmp_path / "b").write_text("theirs")
    with pytest.raises(FileExistsError) as e:
        with atomic.replacing_together([tmp_path / "a", tmp_path / "b"], exclusive=True) as (a, b):
            a.write_text("1")
            b.write_text("2")
    assert e.value.filename == str(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"] and (tmp_path / "b").read_text() == "theirs"
    committed = []

    def on_commit():
        committed.append(sorted(p.name for p in tmp_path.iterdir()))

    with atomic.replacing_together([tmp_path / "c", tmp_path / "d"], exclusive=True, on_commit=on_commit) as (c, d):
        c.write_text("3")
        d.write_text("4")
    assert committed == [["b", "c", "d"]], "on_commit runs once both are in place"
    assert (tmp_path / "c").read_text() == "3" and (tmp_path / "d").read_text() == "4"


@pytest.mark.parametrize("argv,message", [
    (["--previews", "3"], "--previews 3 needs --preview-dir (the folder the previews go to)"),
    (["--preview-dir", ""], "--preview-dir is empty: name the folder the previews go to"),
    (["--preview-dir", " "], "--preview-dir is empty"),
    (["--previews", "8", "--steps", "8", "--preview-dir", "p"], "--previews 8 with 8 steps: at most 7 (a preview "
                                                                "comes after a step, and the last step's image is "
                                                                "the result itself)"),
    (["--previews", "50", "--preview-dir", "p"], "--previews 50 with 50 steps: at most 49"),
    (["--prompt-file", "p.txt"], "--prompt and --prompt-file do not go together: give one"),
])
def test_flags_a_run_would_ignore_are_refused(argv, message):
    """Before: --previews without --preview-dir and an empty --preview-dir wrote nothing, silently; --previews 8
    over 8 steps wrote 7; --prompt beside --prompt-file was dropped."""
    with pytest.raises(ValueError) as e:
        planned("--prompt", "a cat", *argv)
    assert message in str(e.value)


def test_previews_below_the_steps_come_as_many_as_asked():
    """The rule the refusal states: N below the steps gives N distinct previews (preview_steps), none after the
    last step; the default 4 takes what fewer steps have."""
    for steps in range(2, 40):
        for count in range(1, steps):
            picked = preview_steps(steps, count)
            assert len(picked) == count and max(picked) <= steps - 2, (steps, count, picked)
    assert preview_steps(8, 7) == [0, 1, 2, 3, 4, 5, 6]
    _, (image,) = planned("--prompt", "a cat", "--steps", "2", "--preview-dir", "p")
    assert image["previews"] == 4 and preview_steps(2, image["previews"]) == [0]
