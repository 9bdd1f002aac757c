"""timm's NFNet weights: our safetensors reader, the name table, and the golden model.

The golden (tests/data/timm_golden/, written by tools/make_timm_golden.py with timm 1.0.31) is a
width-reduced dm_nfnet_f0 built by timm's own code with random weights; the independent
expectation is timm's logits for it. torch is not needed here. Safetensors fixtures are written
by `_write_safetensors` below, a separate implementation of the format's layout.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nfnets_jax import models, weights
from nfnets_jax.weights import (
    SafetensorsFormatError,
    TimmWeightsError,
    convert_timm_nfnet,
    detect_nfnet_variant,
    load_timm_nfnet,
    match_timm_standardization,
    read_safetensors,
)
from nfnets_jax.weights.safetensors_format import write_safetensors
from nfnets_jax.weights.timm_nfnet import infer_model_name, to_timm_state_dict
from nfnets_jax.train import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "timm_golden"
_CODES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}


def _write_safetensors(path, tensors=None, *, header=None, data=b"", header_bytes=None, length=None):
    """A safetensors file: `tensors` laid out in order, or a hand-made `header`/`data`/prefix."""
    if tensors is not None:
        header, chunks, offset = {}, [], 0
        for name, array in tensors.items():
            raw = np.ascontiguousarray(array).tobytes()
            header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                            "data_offsets": [offset, offset + len(raw)]}
            chunks.append(raw)
            offset += len(raw)
        data = b"".join(chunks)
    if header_bytes is None:
        header_bytes = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(header_bytes) if length is None else length)
    pathlib.Path(path).write_bytes(prefix + header_bytes + data)
    return path


# ---- the safetensors reader ----------------------------------------------------------------

def test_reader_returns_every_dtype_bit_exactly_with_its_shape(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((2, 3, 1, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "bf16": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "scalar": np.array(0.25, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }
    path = _write_safetensors(tmp_path / "w.safetensors", tensors)
    loaded = read_safetensors(path)
    assert list(loaded) == list(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == array.tobytes()


def test_reader_reads_a_file_written_by_the_safetensors_package():
    # weights.safetensors was written by safetensors 0.8.0 (torch); every tensor is float32.
    shapes = json.loads((GOLDEN / "dm_nfnet_f0_state_shapes.json").read_text())
    state = read_safetensors(GOLDEN / "weights.safetensors")
    assert set(state) == set(shapes)  # the tiny model has exactly F0's tensor names
    assert state["stem.conv1.weight"].shape == (2, 3, 3, 3) and state["stages.0.0.skipinit_gain"].shape == ()
    assert all(value.dtype == np.float32 for value in state.values())


def test_the_writer_lays_out_the_file_as_the_format_says(tmp_path):
    tensors = {"b": np.arange(3, dtype=np.float16), "a": np.ones((2, 2), ml_dtypes.bfloat16),
               "s": np.array(2.5, np.float32)}
    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt"})
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert header_size % 8 == 0  # padded, so that the data section starts aligned
    header = json.loads(raw[8:8 + header_size])
    assert header == {"b": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
                      "a": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [6, 14]},
                      "s": {"dtype": "F32", "shape": [], "data_offsets": [14, 18]},
                      "__metadata__": {"format": "pt"}}
    data = raw[8 + header_size:]
    assert data == tensors["b"].tobytes() + tensors["a"].tobytes() + tensors["s"].tobytes()
    loaded = read_safetensors(path)
    assert all(loaded[name].tobytes() == array.tobytes() and loaded[name].dtype == array.dtype
               for name, array in tensors.items())


def test_the_writer_refuses_dtypes_the_format_reader_does_not_take(tmp_path):
    with pytest.raises(ValueError, match="'i' has dtype int32"):
        write_safetensors(tmp_path / "w.safetensors", {"i": np.zeros(2, np.int32)})
    assert not list(tmp_path.iterdir())


def _valid_header(shape=(2, 2), offsets=(0, 16), dtype="F32"):
    return {"__metadata__": {"format": "pt"}, "t": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


@pytest.mark.parametrize(
    "case, make, message",
    [
        ("shorter than the length prefix", lambda p: p.write_bytes(b"\x01\x00"), "fewer than the 8-byte"),
        ("header length beyond the file", lambda p: _write_safetensors(p, header=_valid_header(), data=bytes(16), length=10**6), "its header claims"),
        ("header length near 2**64", lambda p: _write_safetensors(p, header=_valid_header(), data=bytes(16), length=2**64 - 1), "its header claims"),
        ("truncated data", lambda p: _write_safetensors(p, header=_valid_header(), data=bytes(15)), "data section has 15 bytes"),
        ("offsets out of range", lambda p: _write_safetensors(p, header=_valid_header(offsets=(16, 32)), data=bytes(16)), "spans bytes [16, 32)"),
        ("offsets reversed", lambda p: _write_safetensors(p, header=_valid_header(offsets=(16, 0)), data=bytes(16)), "spans bytes"),
        ("size disagrees with shape", lambda p: _write_safetensors(p, header=_valid_header(shape=(3, 2)), data=bytes(16)), "needs 24 bytes"),
        ("unknown dtype", lambda p: _write_safetensors(p, header=_valid_header(dtype="F8_E4M3"), data=bytes(16)), "dtype 'F8_E4M3'"),
        ("negative shape", lambda p: _write_safetensors(p, header=_valid_header(shape=(-2, -2)), data=bytes(16)), "non-negative"),
        ("not JSON", lambda p: _write_safetensors(p, header_bytes=b"\x80\x04not json"), "not UTF-8 JSON"),
        ("JSON but not an object", lambda p: _write_safetensors(p, header_bytes=b"[1, 2]"), "not an object"),
        ("duplicate names", lambda p: _write_safetensors(p, header_bytes=b'{"a": 1, "a": 2}'), "more than once"),
        ("duplicate names among 100k", lambda p: _write_safetensors(p, header_bytes=(
            "{" + ", ".join(f'"t{i}": 1' for i in range(100_000)) + ', "t77777": 2}').encode()), "t77777"),
        ("nested 100k deep", lambda p: _write_safetensors(p, header_bytes=b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
         "nests 100001 levels deep"),
        ("metadata nested deep", lambda p: _write_safetensors(p, header_bytes=b'{"__metadata__": {"a": ' + b"{" * 50_000 + b"}" * 50_000 + b"}}"),
         "levels deep"),
        ("deep but unbalanced", lambda p: _write_safetensors(p, header_bytes=b"{" * 100_000), "levels deep"),
        ("brackets inside strings are not nesting", lambda p: _write_safetensors(p, header_bytes=b'{"[[[[[[": {"a": "{{{{{\\"}}}}"}}'),
         "exactly dtype, shape"),
        ("extra entry field", lambda p: _write_safetensors(p, header={"t": {**_valid_header()["t"], "x": 1}}, data=bytes(16)), "exactly dtype, shape"),
        ("bad metadata", lambda p: _write_safetensors(p, header={**_valid_header(), "__metadata__": {"a": 1}}, data=bytes(16)), "__metadata__"),
    ],
)
def test_malformed_files_are_refused_with_a_clear_error(tmp_path, case, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(SafetensorsFormatError, match="not a valid safetensors file") as error:
        read_safetensors(path)
    assert message in str(error.value), case
    assert str(path) in str(error.value)


def _two_tensor_header(second_offsets):
    return {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": list(second_offsets)},
    }


def test_overlapping_and_unindexed_byte_ranges_are_refused(tmp_path):
    overlapping = _write_safetensors(tmp_path / "o.safetensors", header=_two_tensor_header((8, 24)), data=bytes(24))
    with pytest.raises(SafetensorsFormatError, match="'a' and 'b' overlap"):
        read_safetensors(overlapping)
    hole = _write_safetensors(tmp_path / "h.safetensors", header=_two_tensor_header((20, 36)), data=bytes(36))
    with pytest.raises(SafetensorsFormatError, match=r"bytes \[16, 20\) of the data section belong to no tensor"):
        read_safetensors(hole)
    trailing = _write_safetensors(tmp_path / "t.safetensors", header=_two_tensor_header((16, 32)), data=bytes(40))
    with pytest.raises(SafetensorsFormatError, match=r"bytes \[32, 40\)"):
        read_safetensors(trailing)


def test_a_huge_claimed_tensor_is_refused_before_anything_is_allocated(tmp_path, monkeypatch):
    # 2**40 float32s (4 TiB) claimed by a 100-byte file: refused from the header alone.
    header = {"t": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4 * 2**40]}}
    path = _write_safetensors(tmp_path / "huge.safetensors", header=header, data=bytes(16))
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated before validating"))
    with pytest.raises(SafetensorsFormatError, match="data section has 16 bytes"):
        read_safetensors(path)


# ---- the name table and its checks -----------------------------------------------------------

def _tiny_model():
    facts = json.loads((GOLDEN / "golden.json").read_text())
    model = models.make_forward(facts["our_model"], facts["num_classes"], facts["our_kwargs"])
    return facts, model


def _tiny_expected(model, images):
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, False))[0]


@pytest.fixture(scope="module")
def golden():
    facts, model = _tiny_model()
    arrays = np.load(GOLDEN / "golden.npz")
    images = jnp.asarray(arrays["images_nhwc"])
    forward = jax.jit(lambda params, x: model.apply(params, {}, None, x, False)[0])
    return {"model": model, "forward": forward, "images": images, "arrays": dict(arrays), "facts": facts,
            "expected": _tiny_expected(model, images),
            "state": read_safetensors(GOLDEN / "weights.safetensors")}


def _logits(golden, params):
    return np.asarray(golden["forward"](params, golden["images"]))


@pytest.mark.slow  # ~5-20 s: one compile of a 12-block model (2-core box, loaded by other jobs).
def test_golden_logits_match_timm_run_with_deepmind_numerics(golden):
    """The converted tiny model reproduces timm's logits to 1e-4 of their scale (torch absent)."""
    params = load_timm_nfnet(GOLDEN / "weights.safetensors", golden["expected"])
    logits = _logits(golden, params)
    reference = golden["arrays"]["logits_deepmind_numerics"]
    scale = np.max(np.abs(reference))
    assert scale > 0.5  # non-trivial logits: every tensor of the random model matters
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * scale)
    # timm's shipped numerics (erf GELU, eps 1e-5 in the standardisation) differ measurably;
    # docs/weights.md records how much. 0.4% of the logit scale on this random tiny model.
    timm_difference = np.max(np.abs(logits - golden["arrays"]["logits_timm"])) / scale
    assert 1e-3 < timm_difference < 1e-2
    assert "torch" not in sys.modules


@pytest.mark.slow  # shares the compile of the test above when run in the same session
def test_matching_timms_standardization_leaves_only_the_gelu_difference(golden):
    params = match_timm_standardization(load_timm_nfnet(GOLDEN / "weights.safetensors", golden["expected"]))
    logits = _logits(golden, params)
    scale = np.max(np.abs(golden["arrays"]["logits_timm"]))
    # timm with eps 1e-5 but DeepMind's tanh GELU: reproduced like the golden above.
    np.testing.assert_allclose(logits, golden["arrays"]["logits_timm_eps_only"], rtol=0, atol=1e-4 * scale)
    # timm as shipped: only the erf-vs-tanh GELU is left (4e-4 of the logit scale here).
    assert np.max(np.abs(logits - golden["arrays"]["logits_timm"])) < 1e-3 * scale


def test_matching_timms_standardization_equals_timms_formula_per_kernel():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3, 4, 5)) * np.array([1.0, 0.1, 1e-3, 1e-4, 0.0])  # incl. the floor
    gain = rng.uniform(0.5, 1.5, 5)
    matched = match_timm_standardization({"conv": {"w": kernel, "gain": gain, "bias": np.zeros(5)}}, eps=1e-5)
    fan_in, mean, var = 36, kernel.mean(axis=(0, 1, 2)), kernel.var(axis=(0, 1, 2))
    timm_kernel = (kernel - mean) / np.sqrt(var + 1e-5) * gain / np.sqrt(fan_in)  # timm's ScaledStdConv2d
    ours = (kernel - mean) * matched["conv"]["gain"] / np.sqrt(np.maximum(fan_in * var, 1e-4))  # WSConv2D
    np.testing.assert_allclose(ours, timm_kernel, rtol=1e-12, atol=1e-15)


def test_every_golden_tensor_matters(golden):
    # Guards the golden itself: no gain, skip gain or bias was left at timm's constant init.
    for name, value in golden["state"].items():
        if value.size > 1:
            assert np.std(value) > 0, name
        else:
            assert value != 0 and value != 1, name


@pytest.fixture(scope="module")
def full_f0():
    """timm's own key list and shapes for dm_nfnet_f0 (zeros, a few random), and its conversion."""
    shapes = json.loads((GOLDEN / "dm_nfnet_f0_state_shapes.json").read_text())
    rng = np.random.default_rng(0)
    random = {"stem.conv2.weight", "stem.conv2.gain", "stages.0.0.attn_last.fc1.weight", "head.fc.weight"}
    state = {name: (rng.standard_normal(shape) if name in random else np.zeros(shape)).astype(np.float16)
             for name, shape in shapes.items()}
    return state, convert_timm_nfnet(state)  # checks names and shapes against nfnet_f0's tree


def test_the_name_table_covers_timms_full_f0_and_detects_the_variant(full_f0):
    _, params = full_f0
    assert detect_nfnet_variant(params) == "nfnet_f0"
    assert models.count_params(params) == 71_489_284  # DeepMind's published F0 count
    assert params["NFNet/~/nf_block_3/~/conv1"]["w"].shape == (3, 3, 128, 768)  # grouped HWIO
    assert params["NFNet/~/nf_block"]["skip_gain"].shape == ()


@pytest.mark.parametrize("k", range(7))
def test_the_variant_is_recognised_from_the_blocks_per_stage(k):
    # timm's dm_nfnet_f{k} has (k + 1)·(1, 2, 6, 3) blocks per stage (timm's model_cfgs).
    depths = [(k + 1) * d for d in (1, 2, 6, 3)]
    keys = {f"stages.{s}.{b}.conv1.weight": np.zeros(1) for s, depth in enumerate(depths) for b in range(depth)}
    keys["stages.0.0.conv3.weight"] = np.zeros((256, 1, 1, 1))
    assert infer_model_name(keys) == f"nfnet_f{k}"
    keys["stages.0.0.conv3.weight"] = np.zeros((384, 1, 1, 1))
    assert infer_model_name(keys) == f"nfnet_f{k}plus"


def test_values_are_moved_with_the_right_layout(full_f0):
    state, params = full_f0
    kernel = state["stem.conv2.weight"]  # (out 32, in 16, kh, kw)
    assert params["NFNet/~/stem_conv1"]["w"][2, 0, 5, 7] == kernel[7, 5, 2, 0]
    np.testing.assert_array_equal(params["NFNet/~/stem_conv1"]["gain"], state["stem.conv2.gain"][:, 0, 0, 0])
    np.testing.assert_array_equal(params["NFNet/~/nf_block/~/squeeze_excite/~/linear"]["w"],
                                  state["stages.0.0.attn_last.fc1.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(params["NFNet/~/linear"]["w"], state["head.fc.weight"].T)
    assert params["NFNet/~/linear"]["w"].dtype == np.float16  # the file's dtype is kept


def test_our_params_written_in_timms_layout_are_the_file_timm_wrote(golden, tmp_path):
    # The golden was written by timm from its own module; converting it to our tree and back must
    # give timm's every name, shape and byte, and a file that loads back to the same tree.
    depths = tuple(golden["facts"]["our_kwargs"]["depths"])
    params = load_timm_nfnet(GOLDEN / "weights.safetensors", golden["expected"])
    state = to_timm_state_dict(params, depths)
    assert sorted(state) == sorted(golden["state"])
    for name, array in golden["state"].items():
        assert state[name].shape == array.shape and state[name].tobytes() == array.tobytes(), name
    write_safetensors(tmp_path / "ours.safetensors", state)
    again = load_timm_nfnet(tmp_path / "ours.safetensors", golden["expected"])
    assert all(np.array_equal(again[m][k], params[m][k]) for m in params for k in params[m])


def test_params_of_other_depths_have_no_timm_names(golden):
    params = load_timm_nfnet(GOLDEN / "weights.safetensors", golden["expected"])
    with pytest.raises(ValueError, match="have no timm name"):
        to_timm_state_dict(params, (1, 1, 1, 1))


def test_missing_extra_and_wrongly_shaped_tensors_are_listed_in_one_error(golden):
    state = dict(golden["state"])
    del state["stages.2.3.conv2b.gain"]
    state["stages.2.3.conv4.weight"] = np.zeros((1,), np.float32)
    state["stages.1.1.downsample.conv.bias"] = np.zeros((64,), np.float32)
    state["stages.0.0.conv1.weight"] = np.zeros((16, 15, 1, 1), np.float32)
    state["final_conv.gain"] = np.zeros((256,), np.float32)
    with pytest.raises(TimmWeightsError) as error:
        convert_timm_nfnet(state, golden["expected"])
    message = str(error.value)
    assert "1 missing, 2 unexpected, 2 wrong-shaped or -typed" in message
    assert "missing:     stages.2.3.conv2b.gain -> NFNet/~/nf_block_6/~/conv1b/gain (64,)" in message
    assert "unexpected:  stages.2.3.conv4.weight" in message
    assert "unexpected:  stages.1.1.downsample.conv.bias (64,) (would be NFNet/~/nf_block_2/~/conv_shortcut/bias" in message
    assert "wrong shape: stages.0.0.conv1.weight (16, 15, 1, 1) -> NFNet/~/nf_block/~/conv0/w (1, 1, 15, 16)" in message
    assert "wrong shape: final_conv.gain (256,) is not a ScaledStdConv2d gain (out, 1, 1, 1)" in message


@pytest.mark.parametrize("problem", ["missing", "extra", "wrong shape", "wrong dtype"])
def test_each_kind_of_mismatch_alone_is_refused_naming_the_tensor(golden, problem):
    state = dict(golden["state"])
    if problem == "missing":
        del state["head.fc.bias"]
    elif problem == "extra":
        state["head.fc.bias_extra"] = np.zeros((10,), np.float32)
    elif problem == "wrong shape":
        state["head.fc.bias"] = np.zeros((11,), np.float32)
    else:
        state["head.fc.bias"] = np.array([object()] * 10)
    with pytest.raises(TimmWeightsError, match=r"head\.fc\.bias"):
        convert_timm_nfnet(state, golden["expected"])


def test_a_layout_other_than_dm_nfnet_f_needs_an_explicit_model(golden):
    # Without `expected` the variant is recognised from the layout; the tiny model is none of F0…F7.
    with pytest.raises(TimmWeightsError, match=r"\(2, 2, 6, 3\) blocks per stage is not one of timm.s dm_nfnet_f0…f6.* pass the model's parameter tree"):
        load_timm_nfnet(dict(golden["state"], **{"stages.0.1.conv1.weight": np.zeros(1)}))
    with pytest.raises(TimmWeightsError, match="stages.0.0.conv3.weight has 32 output channels"):
        load_timm_nfnet(golden["state"])


def test_read_params_sends_safetensors_to_the_timm_converter(tmp_path):
    # Dispatch by content, whatever the name (the file below is called .bin).
    state = read_safetensors(GOLDEN / "weights.safetensors")
    shapes = json.loads((GOLDEN / "dm_nfnet_f0_state_shapes.json").read_text())
    assert set(state) == set(shapes)
    copy = tmp_path / "pytorch_model.bin"
    copy.write_bytes((GOLDEN / "weights.safetensors").read_bytes())
    with pytest.raises(TimmWeightsError, match="stages.0.0.conv3.weight has 32 output channels"):
        checkpointing.read_params(str(copy))
    damaged = tmp_path / "model.safetensors"
    damaged.write_bytes(b"\x80\x04garbage")
    with pytest.raises(SafetensorsFormatError):
        checkpointing.read_params(str(damaged))
    assert weights.looks_like_safetensors(GOLDEN / "weights.safetensors")


def test_pytorch_pickle_checkpoints_are_refused_not_read_as_npz(tmp_path):
    # The layout of torch.save's zip archive (`<name>/data.pkl` + storages), without torch.
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pytorch_model/data.pkl", pickle.dumps({"stem.conv1.weight": None}))
        archive.writestr("pytorch_model/data/0", bytes(16))
    with pytest.raises(ValueError, match="PyTorch pickle checkpoint .* use the same weights as .safetensors"):
        checkpointing.read_params(str(path))


@pytest.mark.slow  # a fresh interpreter importing jax and TensorFlow: ~40 s on the loaded 2-core box
def test_eval_refuses_a_safetensors_file_that_is_no_dm_nfnet_at_the_door(tmp_path):
    """`experiments.eval --weights=x.safetensors` reaches the converter; its error is one line
    on stderr, before anything runs (the tiny golden is no F-variant layout; digits config)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "experiments.eval", f"--weights={GOLDEN / 'weights.safetensors'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "error: stages.0.0.conv3.weight has 32 output channels; F0 has 256" in result.stderr
    assert "Traceback" not in result.stderr
