"""Tests for nfnets_jax.weights: DeepMind's pickled weights, our .npz, download, tree checks.

The DeepMind-format fixtures are made here: plain pickles of {module: {leaf: array}} at every
protocol, the numpy-1.x spelling of 2021, dill's own output, dill 0.3.x's `_get_attr` /
`_import_module` indirection, Haiku's `FlatMapping` reduce and jax's `reconstruct_device_array`.
Expected values are the arrays that went in, NumPy arithmetic, hashlib, and DeepMind's published
module and parameter counts (tests/data/official_nfnet_facts.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import types
import zipfile

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nfnets_jax import weights
from nfnets_jax.weights import (
    ChecksumMismatchError,
    ParamsMismatchError,
    UnsafeCheckpointError,
    check_params_match,
    detect_nfnet_variant,
    download,
    fetch_released_params,
    load_deepmind_params,
    load_npz,
    save_npz,
)

# --------------------------------------------------------------------------------------------
# The official NFNet-F parameter layout, rebuilt from the official `nfnet.py:NFNet`: stem convs
# 3->16->32->64->width[0]/2, stages of depth (k+1)*(1, 2, 6, 3) and width (256, 512, 1536, 1536)
# (F+: (384, 768, 2048, 2048)), bottleneck width 0.5*out rounded down to whole groups of 128, a
# shortcut conv on each stage's first block, SE hidden width 0.5*out, final conv 2*last width.
# --------------------------------------------------------------------------------------------

_BASE_DEPTHS = (1, 2, 6, 3)
_WIDTHS = {False: (256, 512, 1536, 1536), True: (384, 768, 2048, 2048)}
_GROUP_WIDTH = 128


def _conv(kh: int, in_per_group: int, out: int) -> dict[str, tuple[int, ...]]:
    return {"w": (kh, kh, in_per_group, out), "gain": (out,), "bias": (out,)}


def official_nfnet_shapes(depth_index: int, plus: bool = False, num_classes: int = 1000) -> dict:
    """{module: {leaf: shape}} of DeepMind's NFNet-F{depth_index}[+]."""
    tree: dict[str, dict[str, tuple[int, ...]]] = {}
    widths = _WIDTHS[plus]
    stem = (3, 16, 32, 64, widths[0] // 2)
    for i in range(4):
        tree[f"NFNet/~/stem_conv{i}"] = _conv(3, stem[i], stem[i + 1])
    in_ch, block = stem[-1], 0
    for depth, out in zip(((depth_index + 1) * d for d in _BASE_DEPTHS), widths):
        mid = (out // 2) // _GROUP_WIDTH * _GROUP_WIDTH
        for index_in_stage in range(depth):
            name = "NFNet/~/nf_block" + (f"_{block}" if block else "")
            tree[name] = {"skip_gain": ()}
            tree[f"{name}/~/conv0"] = _conv(1, in_ch, mid)
            tree[f"{name}/~/conv1"] = _conv(3, _GROUP_WIDTH, mid)
            tree[f"{name}/~/conv1b"] = _conv(3, _GROUP_WIDTH, mid)
            tree[f"{name}/~/conv2"] = _conv(1, mid, out)
            if index_in_stage == 0:
                tree[f"{name}/~/conv_shortcut"] = _conv(1, in_ch, out)
            tree[f"{name}/~/squeeze_excite/~/linear"] = {"w": (out, out // 2), "b": (out // 2,)}
            tree[f"{name}/~/squeeze_excite/~/linear_1"] = {"w": (out // 2, out), "b": (out,)}
            in_ch, block = out, block + 1
    tree["NFNet/~/final_conv"] = _conv(1, in_ch, 2 * in_ch)
    tree["NFNet/~/linear"] = {"w": (2 * in_ch, num_classes), "b": (num_classes,)}
    return tree


def as_shape_structs(shapes: dict) -> dict:
    return {
        m: {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in leaves.items()} for m, leaves in shapes.items()
    }


def as_zero_views(shapes: dict) -> dict:
    """Full-size arrays that take no memory (zero strides), for name/shape checks only."""
    return {
        m: {k: np.broadcast_to(np.float32(0), s) for k, s in leaves.items()} for m, leaves in shapes.items()
    }


# Published by DeepMind's code measured under jax.eval_shape (tests/data/official_nfnet_facts.json).
_DEEPMIND_PARAM_COUNTS = {
    "F0": 71489284, "F1": 132634256, "F2": 193779228, "F3": 254924200, "F4": 316069172,
    "F5": 377214144, "F6": 438359116, "F7": 499504088, "F0+": 118824516, "F1+": 220357008,
    "F2+": 321889500, "F3+": 423421992, "F4+": 524954484, "F5+": 626486976, "F6+": 728019468,
    "F7+": 829551960,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_DEEPMIND_PARAM_COUNTS))
def test_rebuilt_official_layout_has_deepminds_param_counts(name):
    shapes = official_nfnet_shapes(int(name[1]), plus=name.endswith("+"))
    total = sum(int(np.prod(s)) for leaves in shapes.values() for s in leaves.values())
    assert total == _DEEPMIND_PARAM_COUNTS[name]


def test_rebuilt_f0_layout_has_deepminds_module_and_leaf_counts():
    shapes = official_nfnet_shapes(0)
    assert len(shapes) == 94
    assert sum(len(leaves) for leaves in shapes.values()) == 233
    assert shapes["NFNet/~/nf_block_9/~/conv_shortcut"]["w"] == (1, 1, 1536, 1536)
    assert shapes["NFNet/~/nf_block_3/~/conv1b"]["w"] == (3, 3, 128, 768)


# --------------------------------------------------------------------------------------------
# Small trees with real NFNet names, for files that must carry data.
# --------------------------------------------------------------------------------------------


def small_tree(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "NFNet/~/stem_conv0": {
            "w": rng.standard_normal((3, 3, 3, 4)).astype(np.float32),
            "gain": rng.standard_normal(4).astype(np.float32),
            "bias": rng.standard_normal(4).astype(np.float32),
        },
        "NFNet/~/nf_block_10": {"skip_gain": np.array(0.25, dtype=np.float32)},
        "NFNet/~/nf_block_2/~/squeeze_excite/~/linear_1": {
            "w": np.asfortranarray(rng.standard_normal((2, 5)).astype(np.float32)),
            "b": np.zeros(5, dtype=np.float32),
        },
        "NFNet/~/linear": {
            "w": rng.standard_normal((6, 3)).astype(np.float32),
            "b": np.arange(3, dtype=np.float32),
        },
    }


def assert_same_tree(loaded, expected):
    assert type(loaded) is dict
    assert list(loaded) == list(expected)
    for module, leaves in expected.items():
        assert type(loaded[module]) is dict
        assert list(loaded[module]) == list(leaves)
        for leaf, want in leaves.items():
            got = loaded[module][leaf]
            assert type(got) is np.ndarray, (module, leaf, type(got))
            assert got.dtype == want.dtype and got.shape == want.shape, (module, leaf)
            np.testing.assert_array_equal(got, want)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# DeepMind-format files that must load.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_pickled_dict_of_dicts_loads_exactly(tmp_path, protocol):
    tree = small_tree()
    path = write(tmp_path / "F0_haiku.npz", pickle.dumps(tree, protocol=protocol))
    assert_same_tree(load_deepmind_params(path), tree)


def test_numpy1_spelling_of_2021_loads(tmp_path):
    """numpy 1.x wrote `numpy.core.multiarray._reconstruct` (numpy 2 writes `numpy._core`)."""
    tree = small_tree()
    data = pickle.dumps(tree, protocol=2)
    numpy2_global = b"cnumpy._core.multiarray\n_reconstruct\n"
    assert numpy2_global in data
    data = data.replace(numpy2_global, b"cnumpy.core.multiarray\n_reconstruct\n")
    assert_same_tree(load_deepmind_params(write(tmp_path / "f.npz", data)), tree)


def test_numpy_scalar_leaf_loads_as_0d_array(tmp_path):
    tree = {"NFNet/~/nf_block": {"skip_gain": np.float32(0.75)}}
    data = pickle.dumps(tree, protocol=4)
    assert b"scalar" in data  # numpy scalars pickle through multiarray.scalar
    loaded = load_deepmind_params(write(tmp_path / "f.npz", data))
    assert loaded["NFNet/~/nf_block"]["skip_gain"].shape == ()
    assert loaded["NFNet/~/nf_block"]["skip_gain"] == np.float32(0.75)


def test_file_written_through_dill_loads(tmp_path):
    dill = pytest.importorskip("dill")
    tree = small_tree(seed=1)
    data = dill.dumps(tree)
    assert b"dill._dill" in data  # dill wraps arrays in its own reconstruction helpers
    assert_same_tree(load_deepmind_params(write(tmp_path / "f.npz", data)), tree)


def _len_prefixed(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def test_dill_03x_get_attr_import_module_layout_loads(tmp_path):
    """dill 0.3.x (2021) writes numpy's C `_reconstruct` as
    `dill._dill._get_attr(dill._dill._import_module('numpy.core._multiarray_umath'), '_reconstruct')`.
    This fixture spells exactly that in protocol-2 opcodes, without needing dill installed."""
    tree = small_tree(seed=2)
    data = pickle.dumps(tree, protocol=2)
    via_dill = (
        b"cdill._dill\n_get_attr\n"
        + b"cdill._dill\n_import_module\n" + _len_prefixed("numpy.core._multiarray_umath") + b"\x85R"
        + _len_prefixed("_reconstruct") + b"\x86R"
    )  # fmt: skip
    data = data.replace(b"cnumpy._core.multiarray\n_reconstruct\n", via_dill)
    assert_same_tree(load_deepmind_params(write(tmp_path / "f.npz", data)), tree)


def test_haiku_flatmapping_pickle_loads_as_plain_dicts(tmp_path):
    tree = small_tree(seed=3)
    flat_mapping = hk.data_structures.to_immutable_dict(tree)
    data = pickle.dumps(flat_mapping, protocol=3)
    assert b"haiku._src.data_structures\nFlatMapping" in data  # the class path old pickles name
    assert_same_tree(load_deepmind_params(write(tmp_path / "f.npz", data)), tree)


def test_jax_device_array_reconstruction_loads_as_numpy(tmp_path, monkeypatch):
    """jax >= 0.2.2x pickled a DeviceArray as `reconstruct_device_array(fun, args, arr_state,
    aval_state)` from `jax._src.device_array`, a module today's jax no longer has."""
    fake_module = types.ModuleType("jax._src.device_array")

    def reconstruct_device_array(fun, args, arr_state, aval_state):
        raise AssertionError("the loader must not call the file's own reconstruction")

    reconstruct_device_array.__module__ = fake_module.__name__
    reconstruct_device_array.__qualname__ = "reconstruct_device_array"
    fake_module.reconstruct_device_array = reconstruct_device_array
    monkeypatch.setitem(sys.modules, fake_module.__name__, fake_module)

    class DeviceArrayLike:
        def __init__(self, value):
            self.value = value

        def __reduce__(self):
            fun, args, arr_state = self.value.__reduce__()
            return reconstruct_device_array, (fun, args, arr_state, {"weak_type": False})

    tree = small_tree(seed=4)
    wrapped = {m: {k: DeviceArrayLike(v) for k, v in leaves.items()} for m, leaves in tree.items()}
    data = pickle.dumps(wrapped, protocol=4)
    assert b"reconstruct_device_array" in data
    assert_same_tree(load_deepmind_params(write(tmp_path / "f.npz", data)), tree)


def test_loaded_tree_is_directly_usable_as_haiku_params(tmp_path):
    def forward(x):
        return hk.Linear(3, name="linear")(jax.nn.relu(hk.Linear(4, name="hidden")(x)))

    model = hk.without_apply_rng(hk.transform(forward))
    x = np.random.default_rng(5).standard_normal((2, 5)).astype(np.float32)
    init_shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(6)
    weights = {
        m: {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in leaves.items()}
        for m, leaves in init_shapes.items()
    }
    path = write(tmp_path / "f.npz", pickle.dumps(hk.data_structures.to_immutable_dict(weights)))
    params = load_deepmind_params(path)
    check_params_match(params, init_shapes)
    hidden = np.maximum(x @ weights["hidden"]["w"] + weights["hidden"]["b"], 0)
    expected = hidden @ weights["linear"]["w"] + weights["linear"]["b"]
    np.testing.assert_allclose(model.apply(params, x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Files that must be refused without running anything.
# --------------------------------------------------------------------------------------------


class _RunsCommand:
    """A pickle payload whose reduce runs a shell command (the classic pickle attack)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    tree = small_tree()
    tree["NFNet/~/linear"]["b"] = _RunsCommand(f"touch {marker}")
    path = write(tmp_path / "F0_haiku.npz", pickle.dumps(tree, protocol=4))
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_deepmind_params(path)
    assert str(refused.value).startswith(
        f"refusing to load global '{os.system.__module__}.system' from {path}: "
        "DeepMind weight files contain only numpy arrays"
    )
    assert not marker.exists()
    # Control: the same bytes through the ordinary unpickler really do run the command.
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    "payload, refused_name",
    [
        (b"cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "global 'builtins.eval'"),
        (b"cbuiltins\ngetattr\n.", "global 'builtins.getattr'"),
        (b"csubprocess\nPopen\n.", "global 'subprocess.Popen'"),
        (b"cnumpy\nload\n.", "global 'numpy.load'"),
        (
            b"chaiku._src.data_structures\nFlatComponents\n.",
            "global 'haiku._src.data_structures.FlatComponents'",
        ),
        # dill's indirection must not become a way to reach any module:
        (
            b"cdill._dill\n_import_module\nX\x02\x00\x00\x00os\x85R.",
            "module 'os' via dill._dill._import_module",
        ),
        (
            b"cdill._dill\n_get_attr\ncdill._dill\n_import_module\nX\x05\x00\x00\x00numpy\x85R"
            b"X\x04\x00\x00\x00load\x86R.",
            "global 'numpy.load'",
        ),
        (
            b"cdill._dill\n_load_type\nX\x08\x00\x00\x00CodeType\x85R.",
            "type 'CodeType' via dill._dill._load_type",
        ),
    ],
)
def test_globals_outside_the_allowlist_are_refused_by_name(tmp_path, payload, refused_name):
    path = write(tmp_path / "f.npz", payload)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load {refused_name} from "):
        load_deepmind_params(path)


def test_state_can_only_be_set_on_numpy_objects(tmp_path):
    """BUILD on anything but an array or dtype could overwrite attributes (e.g. `__defaults__`)."""
    payload = b"cnumpy\ndtype\nN}X\x0c\x00\x00\x00__defaults__)s\x86b."
    with pytest.raises(UnsafeCheckpointError, match="refusing to load state for a function "):
        load_deepmind_params(write(tmp_path / "f.npz", payload))


def _dtype_state(byteorder: str, elsize: int, flags: int) -> bytes:
    """Protocol-2 opcodes for numpy's dtype state tuple (3, byteorder, None, None, None, elsize,
    alignment 1, flags)."""
    return (
        b"(K\x03" + _len_prefixed(byteorder) + b"NNN" + b"J" + elsize.to_bytes(4, "little", signed=True)
        + b"J\x01\x00\x00\x00" + b"J" + flags.to_bytes(4, "little", signed=True) + b"t"
    )  # fmt: skip


def _array_whose_dtype_is_rebuilt(void_size: int, data: bytes, elsize: int, flags: int) -> bytes:
    """{'mod': {'w': array}} where, after the array is built on a memoised 'V<n>' dtype, the file
    BUILDs that same dtype object again with a new item size / flags (a memo trick)."""
    return (
        b"\x80\x02}" + _len_prefixed("mod") + b"}" + _len_prefixed("w")
        + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
        + b"(K\x01K\x01\x85cnumpy\ndtype\n" + _len_prefixed(f"V{void_size}") + b"\x89\x88\x87Rq\x01"
        + _dtype_state("|", void_size, 0) + b"b"
        + b"\x89C" + bytes([len(data)]) + data + b"tb"
        + b"h\x01" + _dtype_state("|", elsize, flags) + b"b0"
        + b"ss."
    )  # fmt: skip


@pytest.mark.parametrize(
    "void_size, data, elsize, flags",
    [
        (1, b"A", 1 << 16, 0),  # a 1-byte array that then claims 64 KiB: reads the heap
        (8, b"\x41" * 8, 8, 0x3F),  # raw bytes that then count as Python object pointers
    ],
    ids=["grow_itemsize", "set_hasobject_flag"],
)
def test_a_dtype_cannot_be_rebuilt_after_an_array_uses_it(tmp_path, void_size, data, elsize, flags):
    """numpy's `dtype.__setstate__` rewrites a void dtype's size and flags in place; a file that
    re-BUILDs a memoised dtype would turn a 1-byte array into a window on process memory."""
    path = write(tmp_path / "f.npz", _array_whose_dtype_is_rebuilt(void_size, data, elsize, flags))
    # Control: numpy itself applies such a state to a dtype in place (the hole being closed). Shown
    # on a dtype no array uses; doing it to a used one, as the file does, corrupts memory.
    unused = np.dtype(f"V{void_size}", copy=True)
    unused.__setstate__((3, "|", None, None, None, elsize, 1, flags))
    assert (unused.itemsize, unused.flags) == (elsize, flags)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load a dtype state .* layout"):
        load_deepmind_params(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unusual_but_genuine_arrays_load_as_pickle_would(tmp_path, protocol):
    """Big-endian (a legitimate byte-order BUILD), empty (`bytes()` under protocols 0-2),
    Fortran-ordered, void and scalar leaves give exactly what the ordinary unpickler gives."""
    leaves = {
        "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
        "big_endian_scalar": np.array(1.5, dtype=">f8"),
        "empty": np.zeros((0, 4), np.float32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        "void": np.frombuffer(b"abcdef", dtype="V3"),
        "half": np.float16(3.0),
    }
    data = pickle.dumps({"mod": leaves}, protocol=protocol)
    loaded = load_deepmind_params(write(tmp_path / "f.npz", data))["mod"]
    for name, want in pickle.loads(data)["mod"].items():
        assert loaded[name].dtype == want.dtype and loaded[name].shape == np.shape(want), name
        np.testing.assert_array_equal(loaded[name], want)


def test_copyreg_extension_codes_are_refused(tmp_path):
    """EXT opcodes fetch objects from copyreg's registry and cache, bypassing the name allowlist."""
    with pytest.raises(UnsafeCheckpointError, match="copyreg extension code"):
        load_deepmind_params(write(tmp_path / "f.npz", b"\x80\x02\x82\x01."))


def test_refused_module_is_never_imported(tmp_path, monkeypatch):
    """Importing is itself running code: a module that leaves a marker on import stays unimported."""
    marker = tmp_path / "imported"
    (tmp_path / "side_effect_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nvalue = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path / "f.npz", b"cside_effect_mod\nvalue\n.")
    with pytest.raises(UnsafeCheckpointError, match="side_effect_mod.value"):
        load_deepmind_params(path)
    assert not marker.exists() and "side_effect_mod" not in sys.modules


def test_object_arrays_are_refused(tmp_path):
    path = write(tmp_path / "f.npz", pickle.dumps({"m": {"w": np.array([1, "a"], dtype=object)}}))
    with pytest.raises(UnsafeCheckpointError, match="Python objects"):
        load_deepmind_params(path)


def test_wrong_file_kinds_get_a_message_that_says_what_to_do(tmp_path):
    npz_path = tmp_path / "ours.npz"
    save_npz(npz_path, small_tree())
    with pytest.raises(ValueError, match="load_npz"):
        load_deepmind_params(npz_path)
    truncated = write(tmp_path / "cut.npz", pickle.dumps(small_tree())[:200])
    with pytest.raises(ValueError, match="truncated"):
        load_deepmind_params(truncated)
    not_a_tree = write(tmp_path / "list.npz", pickle.dumps([np.zeros(2)]))
    with pytest.raises(ValueError, match="not a Haiku parameter file"):
        load_deepmind_params(not_a_tree)


# --------------------------------------------------------------------------------------------
# check_params_match and the variant detector.
# --------------------------------------------------------------------------------------------


def test_check_params_match_accepts_same_names_and_shapes():
    shapes = official_nfnet_shapes(0)
    check_params_match(as_zero_views(shapes), as_shape_structs(shapes))


def test_check_params_match_lists_every_mismatch_by_name():
    shapes = official_nfnet_shapes(0)
    loaded = as_zero_views(shapes)
    del loaded["NFNet/~/nf_block_4/~/conv1b"]["gain"]
    loaded["NFNet/~/nf_block_4/~/conv1b"]["scale"] = np.zeros(3)
    loaded["NFNet/~/linear"]["w"] = np.zeros((3072, 10))
    loaded["NFNet/~/linear"]["b"] = np.zeros((10,))
    with pytest.raises(ParamsMismatchError) as mismatch:
        check_params_match(loaded, as_shape_structs(shapes))
    message = str(mismatch.value)
    assert "1 missing, 1 unexpected, 2 wrong-shaped" in message
    assert "missing:     NFNet/~/nf_block_4/~/conv1b/gain (768,)" in message
    assert "unexpected:  NFNet/~/nf_block_4/~/conv1b/scale (3,)" in message
    assert "wrong shape: NFNet/~/linear/w loaded (3072, 10), model expects (3072, 1000)" in message
    assert "wrong shape: NFNet/~/linear/b loaded (10,), model expects (1000,)" in message


def test_check_params_match_flags_a_different_num_classes_head():
    """The usual fine-tuning mistake: ImageNet weights into a 10-class model."""
    with pytest.raises(ParamsMismatchError) as mismatch:
        check_params_match(
            as_zero_views(official_nfnet_shapes(0)),
            as_shape_structs(official_nfnet_shapes(0, num_classes=10)),
        )
    message = str(mismatch.value)
    assert "(0 missing, 0 unexpected, 2 wrong-shaped; the model has 233 params in 94 modules" in message
    assert message.count("wrong shape:") == 2


@pytest.mark.parametrize("depth_index", range(8))
@pytest.mark.parametrize("plus", [False, True])
def test_variant_is_detected_from_the_official_layout(depth_index, plus):
    tree = as_shape_structs(official_nfnet_shapes(depth_index, plus=plus))
    expected = f"nfnet_f{depth_index}" + ("plus" if plus else "")
    assert detect_nfnet_variant(tree) == expected


def test_released_module_counts_are_deepminds():
    # docs/official_code_notes.md: 94=F0, 178=F1, 262=F2, 346=F3, 430=F4, 514=F5 (and 598=F6).
    for depth_index, count in enumerate((94, 178, 262, 346, 430, 514, 598)):
        assert len(official_nfnet_shapes(depth_index)) == count


def test_variant_detector_refuses_unknown_layouts():
    with pytest.raises(ValueError, match=r"95 modules is not an NFNet-F checkpoint; F0…F7 have \[94, 178"):
        detect_nfnet_variant({f"m{i}": {} for i in range(95)})
    wide = as_shape_structs(official_nfnet_shapes(0))
    wide["NFNet/~/nf_block/~/conv2"]["w"] = jax.ShapeDtypeStruct((1, 1, 256, 512), jnp.float32)
    with pytest.raises(ValueError, match="512 output channels"):
        detect_nfnet_variant(wide)


def test_model_registry_f0_tree_matches_the_official_layout():
    models = pytest.importorskip("nfnets_jax.models")
    if not hasattr(models, "create"):
        pytest.skip("nfnets_jax.models.create is not available yet")
    model = hk.transform_with_state(lambda x: models.create("nfnet_f0", 1000)(x, is_training=True))
    params, _ = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    check_params_match(as_zero_views(official_nfnet_shapes(0)), params)
    assert detect_nfnet_variant(params) == "nfnet_f0"


# --------------------------------------------------------------------------------------------
# Our own .npz files.
# --------------------------------------------------------------------------------------------


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def test_npz_round_trip_is_exact_for_every_dtype(tmp_path):
    rng = np.random.default_rng(7)
    values = rng.standard_normal((3, 4))
    tree = small_tree()
    tree["NFNet/~/nf_block/~/conv1"] = {
        "w_bf16": values.astype(ml_dtypes.bfloat16),
        "w_f16": values.astype(np.float16),
        "w_f64": values,
        "w_fp8": values.astype(ml_dtypes.float8_e4m3fn),
        "steps": np.arange(5, dtype=np.int32),
        "scalar_bf16": np.array(1.5, dtype=ml_dtypes.bfloat16),
    }
    path = tmp_path / "params.npz"
    save_npz(path, tree)
    loaded = load_npz(path)
    assert list(loaded) == list(tree)
    for module, leaves in tree.items():
        assert list(loaded[module]) == list(leaves)
        for leaf, want in leaves.items():
            got = loaded[module][leaf]
            assert got.dtype == want.dtype and got.shape == want.shape, (module, leaf)
            np.testing.assert_array_equal(_bits(np.ascontiguousarray(got)), _bits(np.ascontiguousarray(want)))


def test_npz_is_plain_numpy_with_slash_joined_keys(tmp_path):
    tree = {"NFNet/~/linear": {"w": np.ones((2, 2), ml_dtypes.bfloat16), "b": np.zeros(2, np.float32)}}
    path = tmp_path / "params.npz"
    save_npz(path, tree)
    assert sorted(os.listdir(tmp_path)) == ["params.npz"]  # no temporary file left behind
    assert zipfile.is_zipfile(path)
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["NFNet/~/linear/b", "NFNet/~/linear/w", "__dtypes__"]
        # bfloat16 1.0 is 0x3F80; stored as its bit pattern.
        np.testing.assert_array_equal(archive["NFNet/~/linear/w"], np.full((2, 2), 0x3F80, np.uint16))


def test_npz_saves_jax_arrays(tmp_path):
    tree = {"NFNet/~/linear": {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}}
    save_npz(tmp_path / "p.npz", tree)
    loaded = load_npz(tmp_path / "p.npz")["NFNet/~/linear"]["w"]
    assert loaded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded.astype(np.float32), np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("recorded", ["finfo", "real", "no_such_dtype", "float8_e4m3fn"])
def test_npz_dtype_record_names_only_ml_dtypes_scalar_types(tmp_path, recorded):
    """The record comes from the file: a module attribute that is not a scalar type (or has the
    wrong width: float8 is 1 byte, the stored bits are 8) gets a message, not numpy's TypeError
    (np.dtype of `finfo` is the 8-byte object dtype, which numpy then refuses to view into)."""
    path = tmp_path / "p.npz"
    np.savez(path, **{"m/w": np.zeros(2, np.uint64), "__dtypes__": np.array(f'{{"m/w": "{recorded}"}}')})
    with pytest.raises(ValueError, match=f"records dtype '{recorded}', which ml_dtypes"):
        load_npz(path)


def test_npz_refuses_what_it_cannot_store_exactly(tmp_path):
    with pytest.raises(TypeError, match="Python objects"):
        save_npz(tmp_path / "p.npz", {"m": {"w": np.array([None])}})
    with pytest.raises(ValueError, match="without '/'"):
        save_npz(tmp_path / "p.npz", {"m": {"a/b": np.zeros(1)}})
    dm_pickle = write(tmp_path / "F0_haiku.npz", pickle.dumps(small_tree()))
    with pytest.raises(ValueError, match="load_deepmind_params"):
        load_npz(dm_pickle)


def test_deepmind_file_converts_to_npz_exactly(tmp_path):
    tree = small_tree(seed=8)
    source = write(tmp_path / "F0_haiku.npz", pickle.dumps(hk.data_structures.to_immutable_dict(tree)))
    save_npz(tmp_path / "f0.npz", load_deepmind_params(source))
    assert_same_tree(load_npz(tmp_path / "f0.npz"), tree)


# --------------------------------------------------------------------------------------------
# Download with checksum, and the released-weights table.
# --------------------------------------------------------------------------------------------


def test_download_file_url_returns_sha256_and_writes_bytes(tmp_path):
    content = os.urandom(3 * 1024 * 1024 + 17)  # spans several read chunks
    source = write(tmp_path / "src.bin", content)
    dest = tmp_path / "cache" / "dest.bin"
    digest = download(source.as_uri(), dest)
    assert digest == hashlib.sha256(content).hexdigest()
    assert dest.read_bytes() == content
    assert download(source.as_uri(), dest, sha256=digest.upper()) == digest  # pinned, any case
    assert sorted(os.listdir(dest.parent)) == ["dest.bin"]


def test_download_with_wrong_sha256_leaves_nothing_behind(tmp_path):
    source = write(tmp_path / "src.bin", b"weights")
    dest_dir = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError, match=hashlib.sha256(b"weights").hexdigest()):
        download(source.as_uri(), dest_dir / "dest.bin", sha256="0" * 64)
    assert os.listdir(dest_dir) == []
    old = write(dest_dir / "dest.bin", b"previous good file")
    with pytest.raises(ChecksumMismatchError):
        download(source.as_uri(), old, sha256="1" * 64)
    assert old.read_bytes() == b"previous good file" and os.listdir(dest_dir) == ["dest.bin"]


def test_download_rejects_bad_arguments_before_touching_disk(tmp_path):
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        download("file:///nonexistent", tmp_path / "x" / "d", sha256="abc")
    with pytest.raises(ValueError, match="must use one of"):
        download("ftp://example.invalid/F0_haiku.npz", tmp_path / "x" / "d")
    assert not (tmp_path / "x").exists()


def test_released_weights_table():
    urls = {name: release.url() for name, release in weights.RELEASED_WEIGHTS.items()}
    base = "https://storage.googleapis.com/dm-nfnets"
    assert urls == {f"nfnet_f{k}": f"{base}/F{k}_haiku.npz" for k in range(7)}
    assert all(release.sha256 is None for release in weights.RELEASED_WEIGHTS.values())
    assert [n for n, r in weights.RELEASED_WEIGHTS.items() if r.trained_with_sam] == ["nfnet_f6"]


def _names_only_tree(depth_index: int) -> dict:
    """Official names with 1-element leaves, except the width the detector reads."""
    tree = {
        m: {k: np.zeros((1,) * len(s), np.float32) for k, s in leaves.items()}
        for m, leaves in official_nfnet_shapes(depth_index).items()
    }
    tree["NFNet/~/nf_block/~/conv2"]["w"] = np.zeros((1, 1, 1, 256), np.float32)
    return tree


def test_fetch_released_params_from_a_mirror(tmp_path):
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    tree = _names_only_tree(0)
    data = pickle.dumps(hk.data_structures.to_immutable_dict(tree))
    write(mirror / "F0_haiku.npz", data)
    write(mirror / "F1_haiku.npz", data)  # mislabelled: F0 weights under F1's name
    digest = hashlib.sha256(data).hexdigest()

    assert_same_tree(fetch_released_params("nfnet_f0", cache, base_url=mirror.as_uri()), tree)
    (cache / "F0_haiku.npz").write_bytes(b"corrupted cache")  # a pinned digest repairs the cache
    assert_same_tree(fetch_released_params("nfnet_f0", cache, sha256=digest, base_url=mirror.as_uri()), tree)
    assert (cache / "F0_haiku.npz").read_bytes() == data
    with pytest.raises(ChecksumMismatchError):
        fetch_released_params("nfnet_f0", tmp_path / "other", sha256="2" * 64, base_url=mirror.as_uri())
    with pytest.raises(ValueError, match="holds nfnet_f0 weights, not nfnet_f1"):
        fetch_released_params("nfnet_f1", cache, base_url=mirror.as_uri())
    with pytest.raises(ValueError, match="released no weights for 'nfnet_f7'"):
        fetch_released_params("nfnet_f7", cache, base_url=mirror.as_uri())


# ---- Untrusted JSON in weight files: bounded depth, linear time ------------------------------------

def test_nesting_depth_is_measured_outside_strings_and_matches_a_recursive_count():
    from nfnets_jax.weights import bounded_json  # pylint: disable=import-outside-toplevel

    def recursive_depth(value):
        if isinstance(value, dict):
            return 1 + max((recursive_depth(v) for v in value.values()), default=0)
        if isinstance(value, list):
            return 1 + max((recursive_depth(v) for v in value), default=0)
        return 0

    for value in (1, "x", [], {}, {"a": [1, [2, {"b": "[{[{"}]]}, [[[[]]]], {"}": '"{\\'}, [{"a": {"b": []}}]):
        text = json.dumps(value).encode()
        assert bounded_json.nesting_depth(text) == recursive_depth(value), value


def test_an_npz_dtype_record_nested_deep_or_not_a_string_is_refused(tmp_path):
    import zipfile as zip_module  # pylint: disable=import-outside-toplevel

    for record, message in ((np.array('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), "levels deep"),
                            (np.zeros(3), "one JSON string")):
        path = tmp_path / "record.npz"
        np.savez(path, **{"m/w": np.zeros(2, np.float32), weights.npz_format.DTYPES_KEY: record})
        assert zip_module.is_zipfile(path)
        with pytest.raises(ValueError, match=message):
            weights.load_npz(str(path))


@pytest.mark.parametrize("values, message", [
    (np.array(["a", "b"]), "holds <U1 values, not numbers"),
    (np.array([True, False]), "holds bool values, not numbers"),
    (np.array([1.0, np.nan], np.float32), "holds 1 NaN or infinite"),
    (np.array([np.inf], np.float16), "holds 1 NaN or infinite"),
    (np.array([1.0, np.nan], ml_dtypes.bfloat16), "holds 1 NaN or infinite"),
])
def test_a_weight_file_of_anything_but_finite_numbers_is_refused_when_read(tmp_path, values, message):
    path = str(tmp_path / "w.npz")
    np.savez(path, **{"NFNet/~/linear/w": values}) if values.dtype.kind == "U" else weights.save_npz(
        path, {"NFNet/~/linear": {"w": values}})
    with pytest.raises(ValueError, match=message) as error:
        weights.read_weight_file(path)
    assert path in str(error.value) and "NFNet/~/linear/w" in str(error.value)
