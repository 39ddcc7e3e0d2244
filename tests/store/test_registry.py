"""Registry behaviour with small dummy files: versions, aliases, atomic publish, integrity."""

import json
import os
import threading

import pytest

from model_store.errors import IntegrityError, InvalidReferenceError, NotFoundError, StoreError
from model_store.manifest import ArchConfig, Lineage, TokenizerInfo
from model_store.registry import STAGING_DIR, ModelStore, store_root

CFG = ArchConfig(n_layer=1, n_head=1, n_embd=8, n_positions=16, vocab_size=32, n_inner=32)


def publish(store: ModelStore, name: str, payload: bytes = b"weights") -> str:
    with store.publish(name) as staging:
        (staging.path / "model.safetensors").write_bytes(payload)
        (staging.path / "tokenizer.json").write_text("{}")
        stored = staging.commit(
            config=CFG, dtype="float32", tokenizer=TokenizerInfo(0, 0), lineage=Lineage(source="local-directory")
        )
    return stored.ref


def test_versions_are_numbered_and_latest_is_implicit(store):
    assert publish(store, "m", b"one") == "m@1"
    assert publish(store, "m", b"two") == "m@2"
    assert store.versions("m") == [1, 2]
    assert store.resolve("m").manifest.version == 2
    assert store.resolve("m@latest").manifest.version == 2
    assert (store.resolve("m@1").path / "model.safetensors").read_bytes() == b"one"
    assert store.names() == ["m"]


def test_manifest_lists_every_file_with_size_and_hash(store):
    publish(store, "m", b"abc")
    manifest = store.resolve("m@1").manifest
    files = {f.path: f for f in manifest.files}
    assert set(files) == {"model.safetensors", "tokenizer.json"}
    assert files["model.safetensors"].size == 3
    assert files["model.safetensors"].sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert manifest.package_version and manifest.created_at.endswith("Z")


def test_aliases_point_to_versions_and_can_move(store):
    publish(store, "m")
    publish(store, "m")
    store.promote("m@1", "prod")
    store.promote("m@2", "staging")
    assert store.resolve("m@prod").manifest.version == 1
    store.promote("m@staging", "prod")  # promote what staging points to
    assert store.resolve("m@prod").manifest.version == 2
    assert store.aliases("m") == {"prod": 2, "staging": 2}


@pytest.mark.parametrize(
    "ref, error, fragment",
    [
        ("nope", NotFoundError, "no model named 'nope'"),
        ("m@7", NotFoundError, "m has no version 7 (versions: 1)"),
        ("m@prod", NotFoundError, "m has no alias 'prod'"),
        ("../x", InvalidReferenceError, "invalid model name '../x'"),
        ("/etc/passwd", InvalidReferenceError, "invalid model name"),
        ("", InvalidReferenceError, "empty"),
    ],
)
def test_bad_references_get_clear_errors(store, ref, error, fragment):
    publish(store, "m")
    with pytest.raises(error) as err:
        store.resolve(ref)
    assert fragment in str(err.value)


def test_promote_refuses_latest_and_unknown_versions(store):
    publish(store, "m")
    with pytest.raises(InvalidReferenceError, match="'latest' is implicit"):
        store.promote("m@1", "latest")
    with pytest.raises(NotFoundError, match="no version 5"):
        store.promote("m@5", "prod")
    with pytest.raises(InvalidReferenceError):
        store.promote("m@1", "7")


def test_failed_publish_leaves_nothing(store):
    publish(store, "m")
    with pytest.raises(RuntimeError):
        with store.publish("m") as staging:
            (staging.path / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("writer crashed")
    assert store.versions("m") == [1]
    assert list((store.root / STAGING_DIR).iterdir()) == []


def test_staging_is_invisible_until_commit(store):
    with store.publish("m") as staging:
        (staging.path / "model.safetensors").write_bytes(b"x")
        assert store.names() == [] and store.versions("m") == []
        with pytest.raises(NotFoundError):
            store.resolve("m")
        staging.commit(config=CFG, dtype="float32", tokenizer=TokenizerInfo(0, 0), lineage=Lineage(source="x"))
    assert store.versions("m") == [1]


def test_stale_staging_from_dead_process_is_removed(store):
    stale = store.root / STAGING_DIR / "m.999999999.deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    publish(store, "m")
    assert not stale.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_the_damaged_file(store, damage):
    publish(store, "m", b"0123456789")
    path = store.resolve("m@1").path / "model.safetensors"
    path.chmod(0o644)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[4] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(b"01234")
    else:
        path.unlink()
    with pytest.raises(IntegrityError, match="m@1: model.safetensors"):
        store.verify("m@1")


def test_manifest_that_does_not_match_its_directory_is_refused(store):
    publish(store, "m")
    publish(store, "m")
    v1 = store.resolve("m@1").path
    (v1 / "manifest.json").write_text((store.resolve("m@2").path / "manifest.json").read_text())
    with pytest.raises(IntegrityError, match="describes m@2"):
        store.resolve("m@1")


def test_manifest_cannot_point_outside_its_version(store):
    publish(store, "m")
    path = store.resolve("m@1").path / "manifest.json"
    data = json.loads(path.read_text())
    data["files"][0]["path"] = "../../outside"
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="outside the version"):
        store.verify("m@1")


def test_concurrent_publishers_get_distinct_versions(store):
    refs: list[str] = []
    threads = [threading.Thread(target=lambda i=i: refs.append(publish(store, "m", bytes([i])))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(refs) == [f"m@{i}" for i in range(1, 7)]
    for v in range(1, 7):
        store.verify(f"m@{v}")


def test_store_root_defaults_to_repo_models_dir():
    root = store_root(None)
    assert root.name == "models" and (root.parent / "pyproject.toml").is_file()
    assert store_root("") == root
    assert str(store_root("/srv/models")) == "/srv/models"


def test_corrupt_aliases_file_is_a_clear_error(store):
    publish(store, "m")
    (store.root / "m" / "aliases.json").write_text("{not json")
    with pytest.raises(StoreError, match="cannot read aliases of 'm'"):
        store.resolve("m@prod")


def test_versions_are_immutable_after_newer_publishes(store):
    publish(store, "m", b"first")
    before = store.verify("m@1").manifest
    for payload in (b"second", b"third"):
        publish(store, "m", payload)
    assert store.verify("m@1").manifest == before
    for entry in before.files:  # published files are read-only, against accidental edits
        assert os.stat(store.resolve("m@1").path / entry.path).st_mode & 0o222 == 0
