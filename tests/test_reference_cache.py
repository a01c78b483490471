"""The reference caches' keys (reference_cache/, eval_generate/): what makes cached reference numbers another
model's. A key that misses a change reuses the old model's log-probs; one that follows nothing else recomputes."""

import os

import torch

import train
from dpo.reference import cache_key, model_fingerprint, model_identity
from dpo.loss import LossSettings
from dpo.train_settings import TrainSettings
from harness import random_pairs

MIB = 1 << 20


def write_model(directory, size: int = 3 * MIB):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "phi"}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * (size // 256))
    (directory / "README.md").write_text("a model")
    return directory


def rewrite(file, position: int, later: bool = True) -> None:
    """One byte of `file` changed in place, with a later modification time (as writing it does) or the old one."""
    stat = file.stat()
    data = bytearray(file.read_bytes())
    data[position] ^= 0xFF
    file.write_bytes(bytes(data))
    mtime = stat.st_mtime_ns + 10**9 if later else stat.st_mtime_ns
    os.utime(file, ns=(stat.st_atime_ns, mtime))


def test_the_key_follows_each_weight_file_and_config_not_other_files(tmp_path):
    model = write_model(tmp_path / "model")
    pairs = random_pairs(4, 97, seed=0)
    key = lambda: cache_key(model_identity(str(model)), pairs, {"precision": "fp32"})  # noqa: E731
    first = key()
    assert key() == first
    (model / "README.md").write_text("the same model, described again")
    assert key() == first
    weights = model / "model.safetensors"
    rewrite(weights, 3 * MIB // 2)  # the middle, written again: only its time tells
    assert key() != first
    second = key()
    rewrite(weights, 0, later=False)  # the first MiB, with the time put back
    assert key() != second
    third = key()
    rewrite(model / "config.json", 2)
    assert key() != third
    assert cache_key(model_identity(str(model)), pairs, {"precision": "bf16"}) != key()
    assert cache_key(model_identity(str(model)), random_pairs(4, 97, seed=1), {"precision": "fp32"}) != key()


def test_the_key_follows_the_adapter_the_reference_starts_from(tmp_path):
    model = write_model(tmp_path / "model")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(1000))
    pairs = random_pairs(4, 97, seed=0)
    plain = cache_key(model_identity(str(model)), pairs, {})
    first = cache_key(model_identity(str(model), str(adapter)), pairs, {})
    assert first != plain
    rewrite(adapter / "adapter_model.safetensors", 500)  # the adapter trained again, at the same path
    second = cache_key(model_identity(str(model), str(adapter)), pairs, {})
    assert second != first
    rewrite(adapter / "adapter_config.json", 3, later=False)
    assert cache_key(model_identity(str(model), str(adapter)), pairs, {}) != second


def test_a_hub_model_is_known_by_its_cached_snapshot(tmp_path, monkeypatch):
    """A hub name's files load from the local snapshot of the commit its `main` points to: a newer snapshot of the
    same name is another model."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someone--tiny-sft"
    assert model_fingerprint("someone/tiny-sft") == {"hub": "someone/tiny-sft"}  # nothing cached: the name
    for commit in ("a" * 40, "b" * 40):
        write_model(repo / "snapshots" / commit, size=1000)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert model_fingerprint("someone/tiny-sft") == {"hub": "someone/tiny-sft", "revision": "a" * 40}
    (repo / "refs" / "main").write_text("b" * 40)
    assert model_fingerprint("someone/tiny-sft") == {"hub": "someone/tiny-sft", "revision": "b" * 40}
    assert model_fingerprint("not a repository id!") == {"hub": "not a repository id!"}


def test_the_key_takes_the_precision_auto_resolves_to():
    """`auto` is fp32 on the CPU (bf16 or fp16 on a GPU): a cache of an fp32 run is that of an `auto` run here, and
    of no bf16 run."""
    cpu = torch.device("cpu")
    settings = lambda **kw: train.reference_cache_settings(TrainSettings(**kw), cpu)  # noqa: E731
    assert settings(precision="auto") == settings(precision="fp32") == {"precision": "fp32", "completion_only": True}
    assert settings(precision="bf16")["precision"] == "bf16"
    assert settings(loss=LossSettings(ld_alpha=0.5))["ld_alpha"] == 0.5
