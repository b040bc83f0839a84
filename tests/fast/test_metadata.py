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
