"""An image and its JSON sidecar (--metadata) are one unit, on disk and in the run's tally (issue 33, defect 6; the
CLI as a subprocess, tiny checkpoint): a user's NAME.json is never replaced, and a signal at any moment of writing
the pairs leaves each pair whole or absent, and says as many images as there are."""

import json
import signal

import signal_points
from commands import cli_ok

ARGS = ["--height", "64", "--width", "64", "--steps", "2", "--top-k", "1", "--quiet"]


def test_a_users_json_beside_a_free_name_is_kept(model_dir, tmp_path):
    """Before: a.png was free, so the run wrote it and replaced the user's a.json with its record."""
    (tmp_path / "a.json").write_text('{"mine": true}')
    proc = cli_ok("-m", model_dir, "--prompt", "a cat", *ARGS, "--seed", 3, "--metadata",
                  "--output", tmp_path / "a.png")
    assert json.loads((tmp_path / "a.json").read_text()) == {"mine": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-2.json", "a-2.png", "a.json"]
    assert json.loads((tmp_path / "a-2.json").read_text())["seed"] == 3
    assert f"{tmp_path / 'a.json'} exists: writing {tmp_path / 'a-2.png'}" in proc.stderr


def pairs(folder):
    """(the images' names, the sidecars' names), each without its suffix."""
    return ({p.stem for p in folder.glob("*.png")}, {p.stem for p in folder.glob("*.json")})


def test_a_signal_while_pairs_are_written_leaves_each_whole_or_absent(model_dir, tmp_path):
    """At every moment from the first file of the first pair to the end (the temporaries made, the PNG's encoder
    imported and written, the names claimed, the temporaries unlinked), SIGINT or SIGTERM: exit 130 (or the run
    finished), each image has its JSON and each JSON its image, no temporary stays, and the last line counts the
    images there are. Before: a signal after the PNG was renamed into place left it without its JSON, uncounted."""
    def args(out):
        return ["-m", model_dir, "--prompt", "a cat", *ARGS, "--metadata", "--num-images", 2, "--seed", 1,
                "--output", out / "p.png"]

    moments = signal_points.listing("generate", args(tmp_path / "whole"), tmp_path)
    first = next(i for i, m in enumerate(moments, 1) if "/whole/" in m)
    assert any(".p_2.json." in m for m in moments) and any(".p_2.png." in m for m in moments), moments[first - 1:]
    for where in range(first, len(moments) + 1):
        out, sig = tmp_path / f"run{where}", (signal.SIGINT, signal.SIGTERM)[where % 2]
        proc = signal_points.interrupted_at("generate", args(out), where, sig, tmp_path)
        case = (where, moments[where - 1], proc.stderr)
        assert "Traceback" not in proc.stderr, case
        images, sidecars = pairs(out) if out.exists() else (set(), set())
        assert images == sidecars, case
        assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".")], case
        if proc.returncode == 0:
            assert images == {"p_1", "p_2"}, case
            continue
        said = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 130, case
        if images:
            assert said.startswith(f"interrupted; {len(images)} of 2 image(s) written (the last: "), case
        else:
            assert said == "interrupted; no image written", case
