"""Every way a checkpoint can be damaged means: skip it, one warning, use the next older one.

Orbax and TensorStore fail in many ways on damaged files (FileNotFoundError, ValueError, a bare
`Exception("Encountered error while reading array index ...")`, asyncio errors from abandoned
tasks, or no error at all with wrong bytes). The tests below damage every kind of file and
folder a save writes, in every way (truncated, emptied, garbled, deleted, valid JSON with the
wrong content), and check the class: the reader used by evaluation and fine-tuning and the
resume of a training run both fall back to the previous checkpoint, bit-identical to what was
saved, with one warning and a bounded amount of output.

Run as a script (`python tests/test_checkpoint_damage.py WORKDIR`), this file resumes and
finishes a fake-model run in WORKDIR: the child process of the terminal-output test.
"""

import asyncio
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import types

import chex
import numpy as np
import pytest

from nfnets_jax.runtime import stop_signals
import fakes  # tests/fakes.py
from nfnets_jax.train import checkpointing, loop

STEPS = 12
EVERY = 4
CHECKPOINT_LOGGER = checkpointing.__name__
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# Kinds of file orbax writes in a step directory (relative path patterns).
FILE_KINDS = {
    "checkpoint_metadata": r"^_CHECKPOINT_METADATA$",
    "meta_record": r"^meta/metadata$",
    "state_tree_metadata": r"^state/_METADATA$",
    "state_sharding": r"^state/_sharding$",
    "state_manifest": r"^state/manifest\.ocdbt$",
    "state_array_metadatas": r"^state/array_metadatas/",
    "state_process_manifest": r"^state/ocdbt\.process_\d+/manifest\.ocdbt$",
    "state_process_data": r"^state/ocdbt\.process_\d+/d/",
    "state_merged_data": r"^state/d/",
}
FOLDER_KINDS = ("state", "meta", "state/ocdbt.process_0", "state/d", "state/array_metadatas")


def _truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _empty(path):
    os.truncate(path, 0)


def _garble(path):
    data = bytearray(open(path, "rb").read())
    for i in range(len(data) // 4, max(len(data) // 4 + 1, 3 * len(data) // 4)):
        if i < len(data):
            data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def _wrong_json(path):
    """Valid JSON, wrong content (what a confused tool or a partial rewrite leaves)."""
    open(path, "w").write(json.dumps({"step": 3, "tree": {"x": 1}}))


DAMAGES = {"truncated": _truncate, "emptied": _empty, "garbled": _garble, "deleted": os.remove,
           "wrong_json": _wrong_json}
CASES = [(f"{kind}-{damage}", kind, damage) for kind in FILE_KINDS for damage in DAMAGES
         if damage != "wrong_json" or kind in ("checkpoint_metadata", "meta_record", "state_tree_metadata",
                                               "state_sharding")]
CASES += [(f"folder_{folder.replace('/', '_')}-deleted", folder, "folder") for folder in FOLDER_KINDS]


def _numpy_fingerprint(array):
    """The fingerprint's formula, independently in numpy (uint64 arithmetic, reduced mod 2**32)."""
    words = np.ascontiguousarray(array).reshape(-1)
    words = (words.astype(np.uint8) if words.dtype == bool else words).view(
        {1: np.uint8, 2: np.uint16, 4: np.uint32}[words.dtype.itemsize if words.dtype != bool else 1])
    words = words.astype(np.uint64)
    words ^= words >> 16
    index = np.arange(words.size, dtype=np.uint64)
    weights = ((index * 0x9E3779B1) % 2**32) | 1
    return int((words * weights).sum() % 2**32)


def test_fingerprint_matches_its_formula_and_sees_any_single_changed_word():
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    rng = np.random.RandomState(0)
    tree = {"f32": rng.randn(33, 7).astype(np.float32), "i32": rng.randint(-9, 9, 12).astype(np.int32),
            "bf16": np.asarray(jnp.asarray(rng.randn(50), jnp.bfloat16)), "bool": rng.rand(9) > 0.5}
    computed = checkpointing.fingerprint({k: jnp.asarray(v) for k, v in tree.items()})
    for name, array in tree.items():
        assert int(computed[name]) == _numpy_fingerprint(np.asarray(array)), name
    base = tree["f32"].copy()
    seen = {int(checkpointing.fingerprint(jnp.asarray(base)))}
    for index in rng.choice(base.size, 20, replace=False):
        changed = base.copy().reshape(-1)
        changed.view(np.uint32)[index] ^= np.uint32(1 << rng.randint(32))  # one flipped bit
        seen.add(int(checkpointing.fingerprint(jnp.asarray(changed.reshape(base.shape)))))
    assert len(seen) == 21


def _config(steps=STEPS):
    return fakes.fake_config(**{"train.steps": steps, "checkpoint.every_steps": EVERY, "checkpoint.keep": 3})


def _run(workdir, steps=STEPS, **kwargs):
    config = _config(steps)
    return loop.run(fakes.fake_experiment(config, fakes.FakeData(), drop_rate=0.2), str(workdir),
                    prefetch=1, **kwargs)


@pytest.fixture(scope="module")
def stopped_at_8(tmp_path_factory):
    """A workdir whose run stopped at step 8 (checkpoints 4 and 8) and the intact states."""
    workdir = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stop_signals.StopRequests, "should_stop", lambda self, step: step == 8)
        assert _run(workdir).step == 8
    intact = {}
    for step in (4, 8):
        only = tmp_path_factory.mktemp(f"only{step}")
        shutil.copytree(workdir / "checkpoints" / str(step), only / str(step))
        intact[step] = checkpointing.read_latest(str(only))[0]
    return workdir, intact


def _damage(step_dir, kind, damage):
    if damage == "folder":
        shutil.rmtree(step_dir / kind)
        return
    files = [os.path.relpath(os.path.join(root, name), step_dir)
             for root, _, names in os.walk(step_dir) for name in names]
    matching = [name for name in files if re.search(FILE_KINDS[kind], name)]
    assert matching, f"no {kind} file in {sorted(files)}"  # the layout orbax writes changed
    for name in matching:
        DAMAGES[damage](step_dir / name)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == CHECKPOINT_LOGGER and r.levelno >= logging.WARNING]


@pytest.mark.slow
@pytest.mark.parametrize("case, kind, damage", CASES, ids=[case for case, _, _ in CASES])
def test_every_kind_of_damage_to_the_newest_checkpoint_falls_back_with_one_warning(
        case, kind, damage, stopped_at_8, tmp_path, caplog, capfd):
    source, intact = stopped_at_8
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(source / "checkpoints", checkpoints)
    _damage(checkpoints / "8", kind, damage)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        state, meta = checkpointing.read_latest(str(checkpoints))
    warnings = _warnings(caplog)
    step = int(meta["step"])
    # Damage orbax never reads (e.g. a deleted commit marker) may leave step 8 intact: then it
    # must read back exactly as saved. Anything else falls back to step 4, with one warning.
    assert step in (4, 8), case
    assert len(warnings) == (1 if step == 4 else 0), warnings
    if step == 4:
        assert str(checkpoints / "8") in warnings[0]
    chex.assert_trees_all_equal(state, intact[step])
    out, err = capfd.readouterr()
    assert len((out + err).splitlines()) < 5, out + err  # orbax's noise is held back
    assert sorted(os.listdir(checkpoints)) == ["4", "8"]  # a reader moves nothing


def test_eval_and_fine_tuning_read_the_same_checkpoint_resume_falls_back_to(stopped_at_8, tmp_path, caplog):
    """`experiments.eval --workdir` and `init_from=<workdir>` go through `read_workdir_state`."""
    source, intact = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    _damage(workdir / "checkpoints" / "8", "state_merged_data", "truncated")
    with caplog.at_level(logging.WARNING):
        saved = checkpointing.read_workdir_state(str(workdir))
        params = checkpointing.read_params(str(workdir))
    assert saved["step"] == 4
    chex.assert_trees_all_equal(saved["params"], intact[4]["params"])
    chex.assert_trees_all_equal(params, intact[4]["ema_params"])
    assert len(_warnings(caplog)) == 2  # one per read, each naming the skipped checkpoint
    # Resume falls back to the same step (and moves the damaged one aside).
    with pytest.MonkeyPatch.context() as patch:
        # A stop request from step 5 on (one asked for at step 4 would now end the wait for the
        # first batch, before any step).
        patch.setattr(stop_signals.StopRequests, "should_stop", lambda self, step: step > 4)
        assert _run(workdir).step == 5  # resumed at 4, one step, stopped
    assert os.path.isdir(workdir / "corrupt_checkpoints" / "8")


def _edit_meta(step_dir, edit):
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _first_fingerprint_name(meta):
    return sorted(meta["fingerprints"])[0]


FINGERPRINT_EDITS = {
    "one_changed": lambda meta: meta["fingerprints"].update(
        {_first_fingerprint_name(meta): (meta["fingerprints"][_first_fingerprint_name(meta)] + 1) % 2**32}),
    "one_removed": lambda meta: meta["fingerprints"].pop(_first_fingerprint_name(meta)),
    "one_added": lambda meta: meta["fingerprints"].update({"params/not_in_the_state": 7}),
    "one_a_string": lambda meta: meta["fingerprints"].update(
        {_first_fingerprint_name(meta): str(meta["fingerprints"][_first_fingerprint_name(meta)])}),
    "one_a_float": lambda meta: meta["fingerprints"].update(
        {_first_fingerprint_name(meta): meta["fingerprints"][_first_fingerprint_name(meta)] + 0.5}),
    "one_a_list": lambda meta: meta["fingerprints"].update(
        {_first_fingerprint_name(meta): [meta["fingerprints"][_first_fingerprint_name(meta)]]}),
    "all_removed": lambda meta: meta.pop("fingerprints"),
    "all_null": lambda meta: meta.update(fingerprints=None),
}


@pytest.mark.parametrize("edit", sorted(FINGERPRINT_EDITS))
def test_a_wrong_fingerprint_record_is_skipped_like_damaged_arrays(edit, stopped_at_8, tmp_path, caplog):
    """The fingerprints live in the JSON record: any edit of them must make the checkpoint fail
    verification (the arrays are intact, so nothing else would notice)."""
    source, intact = stopped_at_8
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(source / "checkpoints", checkpoints)
    meta = json.loads((checkpoints / "8" / "meta" / "metadata").read_text())
    assert meta["integrity"] == checkpointing.FINGERPRINT_FORMAT and "integrity" not in os.listdir(checkpoints / "8")
    _edit_meta(checkpoints / "8", FINGERPRINT_EDITS[edit])
    with caplog.at_level(logging.WARNING):
        state, meta = checkpointing.read_latest(str(checkpoints))
    assert int(meta["step"]) == 4
    chex.assert_trees_all_equal(state, intact[4])
    assert len(_warnings(caplog)) == 1 and "fingerprint" in _warnings(caplog)[0]


RECORD_EDITS = {
    # A field a resume acts on: the data stream would continue elsewhere.
    "data_position_moved": lambda meta: meta.update(data_position=meta["data_position"] + 8),
    "data_position_a_string": lambda meta: meta.update(data_position=str(meta["data_position"])),
    "step_changed": lambda meta: meta.update(step=meta["step"] + 1),
    # Values that would switch verification off if the reader trusted them.
    "integrity_unknown": lambda meta: meta.update(integrity="none"),
    "integrity_retired_item_format": lambda meta: meta.update(integrity="uint32-weighted-sum-v1"),
    "integrity_removed": lambda meta: meta.pop("integrity"),
    "integrity_and_fingerprints_removed": lambda meta: (meta.pop("integrity"), meta.pop("fingerprints")),
    "retired_crc32_record": lambda meta: (meta.pop("integrity"), meta.pop("fingerprints"),
                                          meta.update(leaf_crc32={})),
    "unknown_field_added": lambda meta: meta.update(skip_verification=True),
    "not_an_object": lambda meta: (meta.clear(), meta.update(record=[1, 2])),
}


@pytest.mark.parametrize("edit", sorted(RECORD_EDITS))
def test_every_field_of_the_record_is_verified_and_none_switches_verification_off(
        edit, stopped_at_8, tmp_path, caplog):
    """The record's fields decide where a resume continues and how a checkpoint is checked: each
    edit, arrays intact, must fail verification like damage (one warning, the next older step)."""
    source, intact = stopped_at_8
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(source / "checkpoints", checkpoints)
    _edit_meta(checkpoints / "8", RECORD_EDITS[edit])
    with caplog.at_level(logging.WARNING):
        state, meta = checkpointing.read_latest(str(checkpoints))
    assert int(meta["step"]) == 4
    chex.assert_trees_all_equal(state, intact[4])
    assert len(_warnings(caplog)) == 1 and "checkpoints/8" in _warnings(caplog)[0]


def test_a_resume_never_acts_on_an_edited_record(stopped_at_8, tmp_path):
    """End to end: the edited step is skipped and set aside, the run continues from the step
    before it and saves the edited step again, verified."""
    source, intact = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    _edit_meta(workdir / "checkpoints" / "8", RECORD_EDITS["data_position_moved"])
    summary = _run(workdir, steps=9)
    assert summary.step == 9 and (workdir / "corrupt_checkpoints" / "8").is_dir()
    assert {4, 8, 9} <= set(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
    _, meta = checkpointing.read_latest(str(workdir / "checkpoints"))
    assert meta["step"] == meta["data_position"] == 9


def test_all_checkpoints_damaged_the_reader_raises_one_clear_error(stopped_at_8, tmp_path):
    source, _ = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    _damage(workdir / "checkpoints" / "8", "state_merged_data", "emptied")
    _damage(workdir / "checkpoints" / "4", "state", "folder")
    with pytest.raises(checkpointing.CorruptCheckpointError, match=r"(?s)step 8: .*step 4: .*Nothing was loaded"):
        checkpointing.read_workdir_state(str(workdir))


def test_resuming_with_another_model_names_the_differences_and_changes_nothing(stopped_at_8, tmp_path):
    source, _ = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    before = sorted(os.listdir(workdir / "checkpoints"))
    config = _config()
    experiment = fakes.fake_experiment(config, fakes.FakeData(num_classes=7), drop_rate=0.2)
    with pytest.raises(checkpointing.IncompatibleCheckpointError, match=r"wrong shape: params/fake_net/~/linear/w checkpoint \(48, 4\)"):
        loop.run(experiment, str(workdir), prefetch=1)
    assert sorted(os.listdir(workdir / "checkpoints")) == before
    assert not (workdir / "corrupt_checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind, damage", [("state_merged_data", "truncated"), ("state/d", "folder"),
                                          ("state_merged_data", "emptied"), ("state_manifest", "deleted"),
                                          ("state", "replaced_by_a_file"), ("meta", "replaced_by_a_file")])
def test_a_resumed_process_prints_one_warning_not_orbax_tracebacks(kind, damage, stopped_at_8, tmp_path):
    source, _ = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    if damage == "replaced_by_a_file":
        shutil.rmtree(workdir / "checkpoints" / "8" / kind)
        (workdir / "checkpoints" / "8" / kind).write_text("not a folder")
    else:
        _damage(workdir / "checkpoints" / "8", kind, damage)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), str(workdir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at step 4." in result.stdout
    assert result.stderr.count("unreadable or corrupt") == 1, result.stderr
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) < 20, result.stderr


def _unraisable_from(call):
    """What `sys.unraisablehook` receives for the exception `call` raises (a real traceback)."""
    try:
        call()
    except Exception as error:  # pylint: disable=broad-except
        return types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=error.__traceback__,
                                     err_msg=None, object=None)
    raise AssertionError("call did not raise")


def test_late_reports_of_failed_io_are_dropped_and_every_other_unraisable_is_passed_on(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpointing._drop_late_reports_of_failed_io()  # pylint: disable=protected-access
    checkpointing._drop_late_reports_of_failed_io()  # pylint: disable=protected-access  # installs once
    closed = asyncio.new_event_loop()
    closed.close()
    late = _unraisable_from(lambda: closed.call_soon_threadsafe(print))
    assert str(late.exc_value) == "Event loop is closed"
    same_text_elsewhere = _unraisable_from(lambda: (_ for _ in ()).throw(RuntimeError("Event loop is closed")))
    other = _unraisable_from(lambda: 1 / 0)

    # A coroutine of orbax's that a failed write abandoned, and one of ours, reported when collected.
    import orbax.checkpoint._src.asyncio_utils as orbax_module  # pylint: disable=import-outside-toplevel

    async def ours():
        return None

    abandoned = [types.SimpleNamespace(**{**vars(other), "object": coroutine}) for coroutine in (
        orbax_module.cancellable(ours()), ours())]
    for unraisable in (late, same_text_elsewhere, other, *abandoned):
        sys.unraisablehook(unraisable)
    assert seen == [same_text_elsewhere, other, abandoned[1]]
    for unraisable in abandoned:
        unraisable.object.close()


# ---- Leftovers that are not readable step folders: they never block a later run -------------------

def _symlink_loop(path):
    shutil.rmtree(path)
    os.symlink(path.name, path)  # a link to itself


def _symlink_elsewhere(path):
    elsewhere = path.parent.parent / "elsewhere"
    shutil.copytree(path, elsewhere)
    shutil.rmtree(path)
    os.symlink(elsewhere, path)


def _regular_file(path):
    shutil.rmtree(path)
    path.write_text("not a checkpoint")


def _empty_folder(path):
    shutil.rmtree(path)
    path.mkdir()


LEFTOVERS = {"symlink_loop": _symlink_loop, "symlink_elsewhere": _symlink_elsewhere,
             "regular_file": _regular_file, "empty_folder": _empty_folder}


@pytest.mark.parametrize("leftover", sorted(LEFTOVERS))
def test_a_newest_step_that_is_not_a_readable_folder_is_set_aside_and_never_blocks_a_run(
        leftover, stopped_at_8, tmp_path, caplog):
    source, intact = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    LEFTOVERS[leftover](workdir / "checkpoints" / "8")
    with caplog.at_level(logging.WARNING):
        state, meta = checkpointing.read_latest(str(workdir / "checkpoints"))  # a reader: moves nothing
    assert meta["step"] == 4 and len(_warnings(caplog)) == 1 and "checkpoints/8" in _warnings(caplog)[0]
    chex.assert_trees_all_equal(state, intact[4])
    summary = _run(workdir)  # resumes from 4 and saves step 8 again, over nothing
    assert summary.stopped_by == "completed" and summary.step == STEPS
    assert os.path.lexists(workdir / "corrupt_checkpoints" / "8")
    assert _run(workdir, steps=STEPS + 4).step == STEPS + 4  # and the next run is not blocked either


def test_a_damaged_step_that_cannot_be_moved_is_renamed_in_place(stopped_at_8, tmp_path, monkeypatch, caplog):
    """A folder without write permission cannot change parents (its `..` entry); as a non-root user
    that is what chmod 000 on a step leaves. The step is renamed next to the others instead, out of
    orbax's sight, and the run goes on."""
    source, _ = stopped_at_8
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    _damage(workdir / "checkpoints" / "8", "state_merged_data", "garbled")
    rename = os.rename

    def refuse_other_parents(source_path, target_path, *args, **kwargs):
        if os.path.dirname(os.fspath(target_path)) != os.path.dirname(os.fspath(source_path)):
            raise PermissionError(13, "Permission denied")
        return rename(source_path, target_path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", refuse_other_parents)
    with caplog.at_level(logging.WARNING):
        assert _run(workdir).step == STEPS
    set_aside = [name for name in os.listdir(workdir / "checkpoints") if name.startswith("8.unreadable-")]
    assert len(set_aside) == 1 and not (workdir / "corrupt_checkpoints" / "8").exists()
    assert _run(workdir, steps=STEPS + 4).step == STEPS + 4


_AS_NOBODY = """
import os, sys
sys.path.insert(0, {tests!r})
import test_checkpoint_damage as t
t._run({warmup!r}, steps=2)   # every import and compile of a run, while files under /root are readable
os.setgid(65534); os.setuid(65534)
print("resumed:", t._run({workdir!r}).step)
print("again:", t._run({workdir!r}, steps=t.STEPS + 4).step)
"""


@pytest.mark.slow
def test_as_a_non_root_user_a_step_without_permissions_never_blocks_a_run(stopped_at_8, tmp_path):
    """chmod 000 on the newest step, by its (non-root) owner: unreadable, and not movable to
    another folder. As root (CI), the run is a child process that drops to `nobody` after its
    imports; as another user, the run is that user's."""
    source, _ = stopped_at_8
    if os.geteuid() != 0:
        workdir = tmp_path / "run"
        shutil.copytree(source, workdir)
        os.chmod(workdir / "checkpoints" / "8", 0)
        assert _run(workdir).step == STEPS and _run(workdir, steps=STEPS + 4).step == STEPS + 4
        assert any(name.startswith("8.unreadable-") for name in os.listdir(workdir / "checkpoints"))
        return
    shared = pathlib.Path(tempfile.mkdtemp(prefix="nfnets-nobody-"))  # directly under /tmp: traversable
    try:
        os.chmod(shared, 0o777)
        workdir = shared / "run"
        shutil.copytree(source, workdir)
        for path in [workdir, *workdir.rglob("*")]:
            os.chown(path, 65534, 65534, follow_symlinks=False)
        os.chmod(workdir / "checkpoints" / "8", 0)
        code = _AS_NOBODY.format(tests=os.path.dirname(os.path.abspath(__file__)), warmup=str(tmp_path / "warmup"),
                                 workdir=str(workdir))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"resumed: {STEPS}" in result.stdout and f"again: {STEPS + 4}" in result.stdout, result.stdout
        assert any(name.startswith("8.unreadable-") for name in os.listdir(workdir / "checkpoints"))
    finally:
        shutil.rmtree(shared, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)  # warnings to stderr, as absl does for the CLI
    _run(sys.argv[1])
