"""Loading never runs code from a file: checkpoints, a run's state, datasets and code databases.

Every test plants a pickle whose unpickling would create a marker file, checks that the load is
refused with a clear error, and that the marker does not exist afterwards. The payloads are live:
`test_the_payloads_are_live` shows that plain unpickling creates the marker.
"""

import ast
import io
import pathlib
import pickle
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from launch import run_in_process
from pipelines.data.datasets import DataError, ImageTensorDataset, load_dataset
from pipelines.infer.extract import extract_codes
from pipelines.store.checkpoint import CheckpointError, load_pixelsnail, load_vqvae
from pipelines.store.codes import CodeDataset, CodeStoreError
from pipelines.store.run_files import StateError
from pipelines.train.pixels import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
PROJECT_SOURCES = ["prior", "vqvae", "pipelines", "scripts", "bench"]


class TouchMarker:
    """Unpickling this calls pathlib.Path.touch(marker): any code could run in its place."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def raw_pickle(marker):
    return pickle.dumps({"state_dict": {"weight": TouchMarker(marker)}})


def torch_saved(marker):
    buffer = io.BytesIO()
    torch.save({"state": TouchMarker(marker), "weight": torch.zeros(2)}, buffer)
    return buffer.getvalue()


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "CODE_WAS_RUN"
    yield path
    assert not path.exists(), "a payload ran"


def test_the_payloads_are_live(tmp_path):
    raw_marker, torch_marker = tmp_path / "raw", tmp_path / "torch"
    pickle.loads(raw_pickle(raw_marker))
    torch.load(io.BytesIO(torch_saved(torch_marker)), weights_only=False)
    assert raw_marker.exists() and torch_marker.exists()


# ------------------------------------------------------------------------------------------------
# (a), (b) checkpoints: a raw pickle or a torch.save file where a checkpoint is expected


@pytest.mark.parametrize("make_payload, reason", [(raw_pickle, "it is a pickle"),
                                                  (torch_saved, "zip archive, as torch.save writes")])
@pytest.mark.parametrize("as_run_directory", [False, True])
@pytest.mark.parametrize("load", [load_pixelsnail, load_vqvae])
def test_a_pickled_checkpoint_is_refused_unopened(tmp_path, marker, make_payload, reason, as_run_directory, load):
    path = tmp_path / "run" / "model.safetensors" if as_run_directory else tmp_path / "model.ckpt"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(make_payload(marker))
    with pytest.raises(CheckpointError) as excinfo:
        load(path.parent if as_run_directory else path)
    assert str(path) in str(excinfo.value) and reason in str(excinfo.value)


@pytest.mark.parametrize("script, args", [
    ("evaluate.py", ["--ckpt", "{ckpt}", "--data", "builtin"]),
    ("sample.py", ["--vqvae", "{ckpt}", "--top", "{ckpt}", "--bottom", "{ckpt}", "--out", "{tmp}/s.png"]),
    ("extract_codes.py", ["--vqvae", "{ckpt}", "--data", "builtin", "--out", "{tmp}/codes.lmdb"]),
])
def test_the_scripts_refuse_a_pickled_checkpoint(tmp_path, marker, script, args):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(torch_saved(marker))
    argv = [arg.format(ckpt=ckpt, tmp=tmp_path) for arg in args]
    result = run_in_process(f"scripts/{script}", *argv)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: {ckpt}")
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "codes.lmdb").exists()


# ------------------------------------------------------------------------------------------------
# (c) a run's state directory: accelerate torch.loads optimizer.bin and random_states_*.pkl


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step pixel run on twelve 8x8 images, to copy and tamper with."""
    root = tmp_path_factory.mktemp("state")
    (root / "images").mkdir()
    for k in range(12):
        Image.fromarray(np.full((8, 8, 3), 20 * k, np.uint8)).save(root / "images" / f"{k:02d}.png")
    config = TrainConfig(data=str(root / "images"), out=str(root / "run"), preset="tiny", steps=2, precision="fp32",
                         n_samples=0)
    train(config)
    names = sorted(path.name for path in (root / "run" / "state").iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.bin", "progress.json", "random_states_0.pkl"]
    return config


def tampered_copy(tiny_run, tmp_path, name, content, remove=None):
    out = tmp_path / "run"
    shutil.copytree(tiny_run.out, out)
    (out / "state" / name).write_bytes(content)
    if remove:
        (out / "state" / remove).unlink()
    return TrainConfig(**{**vars(tiny_run), "out": str(out), "steps": 3, "resume": True}), out / "state" / name


@pytest.mark.parametrize("name, make_payload, remove", [
    ("optimizer.bin", torch_saved, None),
    ("optimizer.bin", raw_pickle, None),
    ("random_states_0.pkl", torch_saved, None),  # accelerate alone would skip it without a word
    ("custom_checkpoint_0.pkl", torch_saved, None),  # accelerate loads these with weights_only=False
    ("model.bin", torch_saved, "model.safetensors"),  # accelerate's fallback when there is no safetensors
    ("model.safetensors", raw_pickle, None),
    ("ema.safetensors", torch_saved, None),
    ("progress.json", raw_pickle, None),
])
def test_a_tampered_state_directory_is_refused_on_resume(tiny_run, tmp_path, marker, name, make_payload, remove):
    config, planted = tampered_copy(tiny_run, tmp_path, name, make_payload(marker), remove)
    with pytest.raises(StateError) as excinfo:
        train(config)
    message = str(excinfo.value)
    assert "\n" not in message and str(planted.parent) in message
    if name.endswith((".bin", ".pkl")):
        assert str(planted) in message and "nothing in it was run" in message
        assert "weights_only=False" not in message
        assert "Unsupported global" in message or "not a torch.save zip archive" in message


def test_an_untampered_copy_resumes(tiny_run, tmp_path):
    config, _ = tampered_copy(tiny_run, tmp_path, "unrelated.txt", b"")
    assert train(config) > 0


# ------------------------------------------------------------------------------------------------
# (d) datasets and code databases


def test_a_cifar_batch_that_would_run_code_is_refused_by_the_trainer(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": TouchMarker(marker), b"labels": [0]}))
    result = run_in_process("scripts/train_pixelsnail.py", "--data", str(folder), "--out", str(tmp_path / "run"))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "data_batch_1" in last and "only numpy arrays are allowed" in last
    assert not (tmp_path / "run").exists()


def test_an_npz_with_pickled_objects_is_refused(tmp_path, marker):
    npz = tmp_path / "val_data.npz"
    np.savez(npz, data=np.array([TouchMarker(marker)], dtype=object), labels=np.array([1]))
    with pytest.raises(DataError, match="val_data.npz"):
        load_dataset(str(npz), "test")


def test_a_code_database_with_pickled_metadata_or_records_is_refused(tmp_path, marker):
    images = ImageTensorDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    plan = dict(top_shape=[1, 1], bottom_shape=[2, 2], top_codes=4, bottom_codes=4, n_classes=0,
                vqvae_sha256="0" * 64, image_size=8, source={"data": "test"})

    def encode(x):
        return torch.zeros(len(x), 1, 1, dtype=torch.long), torch.zeros(len(x), 2, 2, dtype=torch.long)

    databases = {key: tmp_path / f"{key.hex()}.lmdb" for key in ((0).to_bytes(8, "big"), b"__meta__")}
    for key, database in databases.items():
        extract_codes(encode, images, database, plan, batch_size=2, progress=False)
        with lmdb.open(str(database), subdir=True) as env, env.begin(write=True) as txn:
            txn.put(key, raw_pickle(marker))
    with pytest.raises(CodeStoreError, match="record 0 .* damaged record"):
        CodeDataset(databases[(0).to_bytes(8, "big")])[0]
    with pytest.raises(CodeStoreError, match="not a JSON object"):
        CodeDataset(databases[b"__meta__"])


# ------------------------------------------------------------------------------------------------
# The project's own code: no call that could unpickle untrusted data


def dotted_name(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def keyword_is(call, name, value):
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_loads(source):
    """Calls in `source` that could unpickle: pickle/dill/joblib loads, torch.load without
    weights_only=True, np.load with allow_pickle other than False, and Unpickler subclasses that do
    not restrict find_class."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = dotted_name(node.func) or ""
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                        "joblib.load", "cloudpickle.load", "cloudpickle.loads", "pd.read_pickle"):
                problems.append(f"line {node.lineno}: {name}")
            if name == "torch.load" and not keyword_is(node, "weights_only", True):
                problems.append(f"line {node.lineno}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and any(
                k.arg == "allow_pickle" and not keyword_is(node, "allow_pickle", False) for k in node.keywords
            ):
                problems.append(f"line {node.lineno}: np.load with allow_pickle")
        if isinstance(node, ast.ClassDef) and any(dotted_name(base) == "pickle.Unpickler" for base in node.bases):
            if not any(isinstance(item, ast.FunctionDef) and item.name == "find_class" for item in node.body):
                problems.append(f"line {node.lineno}: Unpickler subclass {node.name} without find_class")
    return problems


def test_the_audit_finds_what_it_looks_for():
    bad = ("import pickle, torch, numpy as np\npickle.loads(b'')\ntorch.load('x')\n"
           "torch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
           "class U(pickle.Unpickler):\n    pass\n")
    assert len(unsafe_loads(bad)) == 5
    good = "torch.load('x', weights_only=True)\nnp.load('x', allow_pickle=False)\nnp.load('y')\n"
    assert unsafe_loads(good) == []


def test_no_project_code_can_unpickle_untrusted_data():
    files = [file for folder in PROJECT_SOURCES for file in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = {str(file.relative_to(ROOT)): unsafe_loads(file.read_text()) for file in files}
    assert {file: found for file, found in problems.items() if found} == {}
