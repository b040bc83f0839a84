"""Prompt files and counts under careless input (no model): every entry checked by type with its line or item
number, the file's kind by its suffix in any case, and the run's size bounded before any plan is built."""

import json

import pytest

from mlx_glm_image import runs
from mlx_glm_image.generate import build_parser, plan


def planned(*argv):
    return plan(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("line,message", [
    ({"prompt": ["a", "b"]}, "line 2: prompt must be text, got a list"),
    ({"prompt": 123}, "line 2: prompt must be text, got 123"),
    ({"prompt": "x", "image": 5}, "line 2: image must be a path or a list of paths, got 5"),
    ({"prompt": "x", "image": ["a.png", 3]}, "line 2: image must be a path or a list of paths, got a list"),
    ({"prompt": "x", "seed": "7"}, "line 2: seed must be an integer, got the string '7'"),
    ({"prompt": "x", "steps": True}, "line 2: steps must be an integer, got true"),
    ({"prompt": "x", "guidance": {"a": 1}}, "line 2: guidance must be a number, got an object"),
    ({"prompt": "x", "temperature": "hot"}, "line 2: temperature must be a number, got the string 'hot'"),
    ({"prompt": "x", "size": "²x²"}, r"line 2: size must be WIDTHxHEIGHT in pixels \(multiples of 32\) or auto, got '²x²'"),
    ({"prompt": "x", "size": 64}, r"line 2: size must be WIDTHxHEIGHT in pixels \(multiples of 32\) or auto, got 64"),
])
def test_every_entry_is_checked_by_type_before_any_work(tmp_path, line, message):
    """Before: a list as the prompt generated the images, then crashed before writing them."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n' + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=f"^--prompt-file {path} {message}$"):
        planned("--prompt-file", str(path), "--seed", "1")


def test_a_size_is_read_as_the_server_reads_it(tmp_path):
    """One parser of "WxH" (checks.parse_size) for prompt files and the server's body; "auto": the run's size.
    Before: "²x²" passed str.isdigit and failed in int(), a traceback's words with no file or line."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "size": "96x64"}\n{"prompt": "b", "size": "auto"}\n')
    _, images = planned("--prompt-file", str(path), "--seed", "1", "--width", "128")
    assert [(i["width"], i["height"]) for i in images] == [(96, 64), (128, None)]


@pytest.mark.parametrize("name", ["prompts.JSONL", "prompts.Jsonl"])
def test_the_suffix_in_any_case(tmp_path, name):
    """Before: prompts.JSONL was read as text lines, each JSON object a literal prompt."""
    path = tmp_path / name
    path.write_text('{"prompt": "a cat", "steps": 3}\n')
    _, images = planned("--prompt-file", str(path), "--seed", "1")
    assert [(i["prompt"], i["steps"]) for i in images] == [("a cat", 3)]


def test_a_json_file_is_a_list_of_entries(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a cat", "seed": 4}, {"prompt": "a dog", "size": "64x32"}], indent=2))
    _, images = planned("--prompt-file", str(path), "--seed", "1")
    assert [(i["prompt"], i["seed"], i["width"]) for i in images] == [("a cat", 4, None), ("a dog", 1, 64)]
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "seed": "2"}]))
    with pytest.raises(ValueError, match="item 2: seed must be an integer, got the string '2'"):
        planned("--prompt-file", str(path))
    path.write_text(json.dumps({"prompt": "a"}))
    with pytest.raises(ValueError, match="holds a list of objects"):
        planned("--prompt-file", str(path))


def test_counts_are_bounded_before_the_plan_is_built():
    for argv, message in [(["--num-images", str(10**26)], "--num-images must be from 1 to 10000"),
                          (["--auto-seeds", str(10**9)], "--auto-seeds must be from 1 to 10000"),
                          (["--seed", *map(str, range(10_001))],
                           r"the run would make 10001 images \(1 prompts x 10001 seeds\); a run makes at most 10000")]:
        with pytest.raises(ValueError, match=message):
            planned("--prompt", "x", *argv)
    _, images = planned("--prompt", "x", "--num-images", str(runs.MAX_IMAGES), "--seed", "0")
    assert len(images) == runs.MAX_IMAGES and images[-1]["seed"] == runs.MAX_IMAGES - 1
