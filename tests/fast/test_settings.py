"""The one name table: CLI flag <-> call argument <-> OpenAI body field <-> metadata key, and what is derived from
it (the CLI's parser, the server's parsing)."""

import pytest
from facts import Facts

from mlx_glm_image.generate import build_parser, call_arguments
from mlx_glm_image.pipeline.request import SETTINGS, Request
from mlx_glm_image.images_api import ApiError, form_body, image_requests, typed


def test_every_name_is_unique_and_every_call_name_is_an_argument():
    for attr in ("name", "flag", "key"):
        names = [getattr(s, attr) for s in SETTINGS]
        assert len(set(names)) == len(names), attr
    bodies = [s.body for s in SETTINGS if s.body]
    assert len(set(bodies)) == len(bodies)
    assert {s.name for s in SETTINGS} <= set(Request.arguments())
    assert {s.name: s.default for s in SETTINGS if s.default is not None} == {
        "num_inference_steps": 50, "guidance_scale": 1.5, "guidance_end": 1.0, "previews": 0}


def test_the_cli_parser_is_the_table():
    parser = build_parser()
    text = parser.format_help()
    for s in SETTINGS:
        assert s.flag in text
    args = parser.parse_args(["--steps", "7", "--guidance", "2.5", "--top-p", "0.5", "--seed", "1", "2",
                              "--image", "a.png", "--image", "b.png"])
    assert (args.steps, args.guidance, args.top_p, args.seed, args.image) == (7, 2.5, 0.5, [1, 2], ["a.png", "b.png"])
    image = {"prompt": "x", "seed": 1, "steps": 7, "guidance": None, "image": ["a.png"]}
    assert call_arguments(image) == {"prompt": "x", "seed": 1, "num_inference_steps": 7, "image": ["a.png"]}


@pytest.mark.parametrize("fields,want", [({"seed": "7"}, {"seed": 7}), ({"guidance_scale": "2.5"}, {"guidance_scale": 2.5}),
                                         ({"stream": "True"}, {"stream": True}), ({"cache": '{"Fn_compute_blocks": 2}'},
                                                                                  {"cache": {"Fn_compute_blocks": 2}})])
def test_a_form_field_is_read_as_its_type(fields, want):
    assert form_body({"prompt": "x", **fields}) == {"prompt": "x", **want}


@pytest.mark.parametrize("field,value,kind", [("seed", "7", "a string"), ("seed", True, "a boolean"),
                                              ("seed", 1.5, "a number"), ("top_k", [1], "an array"),
                                              ("guidance_scale", "much", "a string"),
                                              ("guidance_scale", {"a": 1}, "an object"), ("n", "2", "a string")])
def test_a_body_value_of_the_wrong_type_names_its_field(field, value, kind):
    """JSON has types: "7" is a string, not the seed 7 (a form's text is read by form_body)."""
    with pytest.raises(ApiError) as caught:
        typed({"prompt": "x", field: value})
    assert caught.value.param == field and f"Invalid type for '{field}'" in caught.value.message
    assert f"but got {kind} instead" in caught.value.message


class Pipe:
    def request(self, **arguments):
        return Request.from_call(Facts(), **arguments)


def test_server_bodies_become_requests():
    requests, fmt = image_requests(Pipe(), {"prompt": "a cat", "n": 2, "size": "96x64", "seed": 5,
                                            "num_inference_steps": 3, "guidance_scale": 2, "output_format": "jpeg"})
    assert fmt == "jpeg" and [r.seed for r in requests] == [5, 6]
    assert {(r.height, r.width, r.schedule.num_inference_steps, r.schedule.guidance_scale) for r in requests} == {(64, 96, 3, 2)}


@pytest.mark.parametrize("body,param,message", [
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "steps must be an integer from 1 to 1000"),
    ({"prompt": "x", "seed": "abc"}, "seed", "Invalid type for 'seed': expected an integer, but got a string"),
    ({"prompt": "x", "top_p": 2}, "top_p", "top-p must be in (0, 1]"),
    ({"prompt": "x", "size": "100x64"}, None, "multiples of 32"),
    ({"prompt": "x", "size": "big"}, "size", "size must be WIDTHxHEIGHT"),
    ({"prompt": ""}, "prompt", "prompt is required"),
    ({"prompt": "x", "n": 11}, "n", "n must be from 1 to 10"),
    ({"prompt": "x", "output_format": ["png"]}, "output_format", "Invalid type for 'output_format'"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "output_format must be one of"),
])
def test_bad_bodies_are_400_with_the_field(body, param, message):
    with pytest.raises(ApiError) as caught:
        image_requests(Pipe(), body)
    assert caught.value.status == 400 and caught.value.param == param and message in caught.value.message


def test_the_step_cache_from_flags_bodies_and_records():
    from mlx_glm_image.cli import cache_settings
    from mlx_glm_image.pipeline.step_cache import SGLANG as PRESET
    from mlx_glm_image.pipeline.step_cache import DBCacheConfig, TaylorSeerCalibratorConfig

    SGLANG, SGLANG_CALIBRATOR = PRESET.cache_config, PRESET.calibrator_config
    parser = build_parser()
    assert cache_settings(parser.parse_args([])) is None
    assert cache_settings(parser.parse_args(["--cache"])) == {"cache": SGLANG, "calibrator": SGLANG_CALIBRATOR}
    given = cache_settings(parser.parse_args(["--rdt", "0.2", "--Fn", "1", "--taylorseer-order", "0"]))
    assert given == {"cache": DBCacheConfig(**{**SGLANG.__dict__, "residual_diff_threshold": 0.2, "Fn_compute_blocks": 1}),
                     "calibrator": None}, "a field flag turns the cache on, from SGLang's settings"
    with pytest.raises(ValueError, match="Fn_compute_blocks must be an integer >= 1, got 0"):
        cache_settings(parser.parse_args(["--Fn", "0"]))

    requests, _ = image_requests(Pipe(), {"prompt": "x", "cache": True})
    assert (requests[0].cache_config, requests[0].calibrator_config) == (SGLANG, SGLANG_CALIBRATOR)
    requests, _ = image_requests(Pipe(), {"prompt": "x", "cache": {"Fn_compute_blocks": 3}, "calibrator": {"taylorseer_order": 1}})
    assert requests[0].cache_config == DBCacheConfig(Fn_compute_blocks=3)
    assert requests[0].calibrator_config == TaylorSeerCalibratorConfig(taylorseer_order=1)
    default = {"cache_config": SGLANG, "calibrator_config": None}
    assert image_requests(Pipe(), {"prompt": "x"}, defaults=default)[0][0].cache_config == SGLANG, "the server's default"
    assert image_requests(Pipe(), {"prompt": "x", "cache": False}, defaults=default)[0][0].cache_config is None
    form = image_requests(Pipe(), form_body({"prompt": "x", "cache": '{"Bn_compute_blocks": 2}'}))[0][0]
    assert form.cache_config.Bn_compute_blocks == 2
    form = image_requests(Pipe(), form_body({"prompt": "x", "cache": "true"}))[0][0]  # a form field is text
    assert (form.cache_config, form.calibrator_config) == (SGLANG, SGLANG_CALIBRATOR)
    for flags, body in ((["--cache", "--taylorseer-order", "1"], {"calibrator": {"taylorseer_order": 1}}),
                        (["--cache", "--taylorseer-order", "0"], {"calibrator": False})):
        cli = cache_settings(parser.parse_args(flags))
        served = image_requests(Pipe(), {"prompt": "x", "cache": True, **body})[0][0]
        assert (served.cache_config, served.calibrator_config) == (cli["cache"], cli["calibrator"]), \
            "the switch with a calibrator means the same on the command line and in a body"


def test_the_cache_preset_is_one_row_that_the_help_and_the_docs_read():
    """--cache's help and the README (or docs/) spell the preset as its row describes it."""
    import re
    from pathlib import Path

    from mlx_glm_image.pipeline.step_cache import SGLANG

    assert SGLANG.described() == ("F2 B1, warmup 4, threshold 0.4, at most 4 cached steps in a row, "
                                  "TaylorSeer order 2")
    (switch,) = [a for a in build_parser()._actions if "--cache" in a.option_strings]
    assert f"({SGLANG.source}: {SGLANG.described()})" in switch.help
    root = Path(__file__).resolve().parents[2]
    docs = " ".join(" ".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]).split())
    assert f"{SGLANG.source} ({SGLANG.described()})" in re.sub(r"`", "", docs)


@pytest.mark.parametrize("body,message", [
    ({"cache": {"Fn": 2}}, "cache: unknown field 'Fn'; DBCacheConfig has Fn_compute_blocks"),
    ({"cache": 3}, "Invalid type for 'cache': expected true, false or an object, but got an integer instead"),
    ({"cache": {"Fn_compute_blocks": 40}}, "Fn_compute_blocks + Bn_compute_blocks (40 + 0) must be at most the DiT's 30 blocks"),
    ({"cache": {"residual_diff_threshold": "high"}}, "residual_diff_threshold must be a finite number, got 'high'"),
    ({"calibrator": {"taylorseer_order": -1}}, "taylorseer_order must be an integer from 0 to 8"),
])
def test_bad_step_cache_bodies_are_400(body, message):
    with pytest.raises(ApiError) as caught:
        image_requests(Pipe(), {"prompt": "x", **body})
    assert caught.value.status == 400 and message in caught.value.message
