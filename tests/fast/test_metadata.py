"""The metadata format, written and read in one module (the record assembled in another, pipeline/record.py): a
record round-trips through the PNG and the JSON sidecar."""

import json

import numpy as np
import pytest
from facts import Facts
from PIL import Image

from mlx_glm_image import metadata
from mlx_glm_image.pipeline.record import image_record
from mlx_glm_image.pipeline.request import SETTINGS, Request

RUN = {"model": "glm-image-4bit", "quantize": 4, "dtype": "bfloat16", "quantization": {"transformer": None},
       "revision": None, "lora": []}


def test_a_record_round_trips_through_the_png_and_the_sidecar(tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(source)
    request = Request.from_call(Facts(), prompt='a sign "OPEN"', image=str(source), seed=11, num_inference_steps=9,
                                top_k=4)
    record = image_record(request, RUN)
    assert {s.key for s in SETTINGS if s.recorded} | set(RUN) | {"versions", "device"} == set(record)
    assert "previews" not in record, "previews do not change the image"
    assert (record["seed"], record["steps"], record["top_k"], record["temperature"]) == (11, 9, 4, 0.9)
    assert record["image"][0]["path"] == str(source.resolve()) and len(record["image"][0]["sha256"]) == 64

    out = tmp_path / "out.png"
    metadata.write(Image.fromarray(np.zeros((64, 64, 3), np.uint8)), out, record, sidecar=True)
    assert json.loads(Image.open(out).text[metadata.CHUNK]) == record
    assert json.loads(out.with_suffix(".json").read_text()) == record
    for path in (out, out.with_suffix(".json")):
        back = metadata.read(str(path))
        keys = (*(s.key for s in SETTINGS if s.recorded), *metadata.RUN_KEYS)
        assert back == {**{k: record[k] for k in keys}, "image": [str(source.resolve())]}
    assert not list(tmp_path.glob(".*partial")), "written through a temporary file"


def test_reading_what_is_not_a_record(tmp_path):
    plain = tmp_path / "plain.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(plain)
    with pytest.raises(ValueError, match="has no mlx-glm-image metadata"):
        metadata.read(str(plain))
    with pytest.raises(ValueError, match="does not exist"):
        metadata.read(str(tmp_path / "none.png"))
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not mlx-glm-image metadata"):
        metadata.read(str(tmp_path / "x.json"))


def test_the_step_cache_settings_round_trip(tmp_path):
    from mlx_glm_image.pipeline.step_cache import SGLANG as PRESET

    SGLANG, SGLANG_CALIBRATOR = PRESET.cache_config, PRESET.calibrator_config
    request = Request.from_call(Facts(), prompt="x", seed=1, **PRESET.settings())
    record = image_record(request, RUN)
    assert record["cache"]["Fn_compute_blocks"] == 2 and record["calibrator"] == {"taylorseer_order": 2}
    out = tmp_path / "out.png"
    metadata.write(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), out, {**record, "cache_summary": {"cached_steps": [5]}})
    back = metadata.read(str(out))
    assert (back["cache"], back["calibrator"]) == (SGLANG, SGLANG_CALIBRATOR)
    plain = image_record(Request.from_call(Facts(), prompt="x", seed=1), RUN)
    assert plain["cache"] is None and plain["calibrator"] is None


class _Group:
    """Rank ``rank`` of a group of ``size`` (the placements read nothing else of it here)."""

    def __init__(self, size: int, rank: int = 0):
        self.size, self.rank = (lambda: size), (lambda: rank)


def test_where_an_image_was_made_round_trips_and_a_tensor_split_is_said(tmp_path):
    """Before: the record did not say that a tensor split made the image (in bfloat16 visibly another image than
    one process's), so regenerating it elsewhere gave another image silently."""
    from mlx_glm_image.generate import build_parser, plan
    from mlx_glm_image.pipeline.parallel import DataSplit, GuidanceSplit, Single, TensorSplit, rounding_warning

    one, tensor, cfg, data = Single(), TensorSplit(_Group(2)), GuidanceSplit(_Group(2)), DataSplit(_Group(3))
    assert [p.record() for p in (one, tensor, cfg, data)] == [None, {"mode": "tensor", "ranks": 2},
                                                              {"mode": "cfg", "ranks": 2}, {"mode": "data", "ranks": 3}]
    record = image_record(Request.from_call(Facts(), prompt="x", seed=1), {**RUN, "parallel": tensor.record()})
    out = tmp_path / "out.png"
    metadata.write(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), out, record, sidecar=True)
    for path in (out, out.with_suffix(".json")):
        assert metadata.read(str(path))["parallel"] == {"mode": "tensor", "ranks": 2}
    run, _ = plan(build_parser().parse_args(["--config-from-metadata", str(out)]))
    assert run["recorded_parallel"] == {"mode": "tensor", "ranks": 2} and run.get("parallel") is None, \
        "compared with the run's placement, never taken as it"

    made = metadata.read(str(out))["parallel"]
    assert rounding_warning(made, one) == (
        "it was made with --parallel tensor on 2 processes and this run is in one process: a tensor split rounds "
        "differently, so the image may differ (slightly in float32, visibly in bfloat16: docs/parallel.md)")
    assert rounding_warning(None, tensor).startswith("it was made in one process and this run is with --parallel "
                                                     "tensor on 2 processes")
    assert rounding_warning({"mode": "tensor", "ranks": 4}, tensor) is not None, "another split: other sums"
    assert rounding_warning(made, tensor) is None, "the same split: the same sums"
    # cfg and data splits give one process's bits (docs/parallel.md): nothing to say
    assert rounding_warning({"mode": "cfg", "ranks": 2}, one) is None and rounding_warning(None, data) is None


@pytest.mark.parametrize("value,message", [
    ("tensor", "parallel must be null or an object, got the string 'tensor'"),
    ({"mode": "pipeline", "ranks": 2}, "parallel.mode must be one of cfg, data, tensor, cfg,tensor, got the string "
                                       "'pipeline'"),
    ({"mode": "tensor"}, "parallel.ranks must be an integer of 2 or more, got null"),
    ({"mode": "tensor", "ranks": 1}, "parallel.ranks must be an integer of 2 or more, got 1"),
    ({"mode": "tensor", "ranks": True}, "parallel.ranks must be an integer of 2 or more, got true"),
])
def test_a_placement_record_of_the_wrong_kind_is_one_line(tmp_path, value, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"prompt": "x", "seed": 1, "parallel": value}))
    with pytest.raises(ValueError) as refused:
        metadata.read(str(path))
    assert str(refused.value) == f"--config-from-metadata {path}: {message}"
